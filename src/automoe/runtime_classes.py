"""Pickling for classes automoe builds at run time (kernel swaps, HF-compatible MoE modules, EP shards).

Such a class has no importable name, so pickle cannot find it by reference. Its instances pickle instead as
"the class that `factory(*args)` returns" plus their state, with `factory` an importable function and `args`
importable classes or strings; loading calls the factory again, also in a fresh process. That keeps
`torch.save(model)` / `torch.load` (and `copy.deepcopy`) working as they do for the HF model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def built_by(factory: Callable[..., type], *args: Any) -> dict[str, Any]:
    """Class attributes for a class built by `factory(*args)`: pass them to `type(name, bases, attrs)`."""
    return {"__reduce_ex__": _reduce_ex, "automoe_built_by": (factory, args)}


def _reduce_ex(self: object, protocol: int):
    factory, args = type(self).automoe_built_by
    _, _, *state = object.__reduce_ex__(self, max(protocol, 2))
    return (_new_instance, (factory, args), *state)


def _new_instance(factory: Callable[..., type], args: tuple) -> object:
    return object.__new__(factory(*args))
