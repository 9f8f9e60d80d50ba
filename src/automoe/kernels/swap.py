"""Per-instance forward swaps: a verified module gets automoe's forward through a class derived from its own.

Changing the instance's class (not the HF class) to one of automoe.derived's classes, AutoMoE<HF class>, keeps
isinstance, parameter names and HF's hooks, and leaves every other model in the process on HF's code; a model
patched twice or two models of one family share the class, and a pickled model derives it again on load.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..derived import derived_class, kind_of, register_kind


class ForwardSwap:
    """One kind of swap: which modules it takes (`accepts`, asked once per class on its first instance) and the
    forward it gives their class (`forward_for(cls)`), registered as the derived-class kind `kind` by module
    `owner`."""

    def __init__(self, kind: str, owner: str, accepts: Callable[[nn.Module], bool],
                 forward_for: Callable[[type], Callable]):
        self.accepts = accepts
        self.kind = register_kind(kind, owner, lambda cls: ((cls,), {"forward": forward_for(cls)}))

    def owns(self, module: nn.Module) -> bool:
        """`module`'s class is one this swap made."""
        return kind_of(module) == self.kind

    def apply(self, model: nn.Module, mode: str) -> int:
        """Swap every accepted module of `model` and set its `automoe_kernels = mode`; returns how many."""
        verdicts: dict[type, bool] = {}
        count = 0
        for module in model.modules():
            cls = type(module)
            if self.owns(module):
                continue
            if cls not in verdicts:
                verdicts[cls] = self.accepts(module)
            if verdicts[cls]:
                module.__class__ = derived_class(self.kind, cls)
                module.automoe_kernels = mode
                count += 1
        return count
