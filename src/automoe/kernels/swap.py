"""Per-instance forward swaps: a verified module gets a subclass of its own class with automoe's forward.

Changing the instance's class (not the HF class), to one named AutoMoE<HF class>, keeps isinstance, parameter
names and HF's hooks, and leaves every other model in the process on HF's code. One subclass per HF class and kind
of swap, cached, so a model patched twice or two models of one family share it; a pickled model swaps again on load
(runtime_classes.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from ..runtime_classes import built_by

_SWAPS: dict[str, ForwardSwap] = {}


class ForwardSwap:
    """One kind of swap: which modules it takes (`accepts`, asked once per class on its first instance) and the
    forward it gives their class (`forward_for(cls)`). Registered under its owner module's name, which a pickled
    model imports on load to find it."""

    def __init__(self, owner: str, accepts: Callable[[nn.Module], bool], forward_for: Callable[[type], Callable]):
        self.owner, self.accepts, self.forward_for = owner, accepts, forward_for
        self.subclasses: dict[type, type] = {}
        _SWAPS[owner] = self

    def subclass(self, cls: type) -> type:
        if cls not in self.subclasses:
            attrs = {"forward": self.forward_for(cls), "__module__": cls.__module__,
                     **built_by(swapped_class, self.owner, cls)}
            self.subclasses[cls] = type(f"AutoMoE{cls.__name__}", (cls,), attrs)  # own name: reprs and profiles
        return self.subclasses[cls]

    def owns(self, module: nn.Module) -> bool:
        """`module`'s class is one this swap made."""
        return type(module) in self.subclasses.values()

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
                module.__class__ = self.subclass(cls)
                module.automoe_kernels = mode
                count += 1
        return count


def swapped_class(owner: str, cls: type) -> type:
    """`cls` swapped by the kind that module `owner` registers (imported here: a fresh process may not have it)."""
    importlib.import_module(owner)
    return _SWAPS[owner].subclass(cls)
