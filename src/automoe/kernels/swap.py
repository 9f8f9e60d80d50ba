"""Per-instance forward swaps: a verified module gets a subclass of its own class with automoe's forward.

Changing the instance's class (not the HF class) keeps isinstance, parameter names and HF's hooks, and leaves
every other model in the process on HF's code. One subclass per HF class, cached, so a model patched twice or
two models of one family share it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def swap_forwards(
    model: nn.Module,
    mode: str,
    accepts: Callable[[nn.Module], bool],
    forward_for: Callable[[type], Callable],
    subclasses: dict[type, type],
) -> int:
    """Give each module whose class `accepts` (asked once per class, on its first instance) the subclass with
    `forward_for(cls)` as forward and `automoe_kernels = mode`; returns how many modules were swapped."""
    verdicts: dict[type, bool] = {}
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls in subclasses.values():
            continue
        if cls not in verdicts:
            verdicts[cls] = accepts(module)
        if verdicts[cls]:
            if cls not in subclasses:
                attrs = {"forward": forward_for(cls), "__module__": cls.__module__}
                subclasses[cls] = type(cls.__name__, (cls,), attrs)
            module.__class__ = subclasses[cls]
            module.automoe_kernels = mode
            count += 1
    return count
