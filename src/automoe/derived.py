"""The one place that knows which of a model's modules automoe changed: the classes it derives, cached and pickled.

Every module automoe changes gets a class of its own, derived from the HF class it replaces or changes: an instance
of the HF class still (HF's weight init, its recording of router logits, its hooks and peft find it), named
AutoMoE<HF class> (reprs and profiles say what runs). A *kind* names one such change ("moe block", "rmsnorm",
"rope", ...) and says how its class derives from an HF class; each (kind, HF class) is built once and cached here.
Such a class has no importable name, so its instances pickle as (owner module, kind, HF class) plus their state, and
loading imports the owner (which registers the kind) and derives the class again, also in a fresh process: that
keeps torch.save(model) / torch.load and copy.deepcopy working as they do for the HF model. `changes(model)` lists
every module so changed, which describe() reads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

PREFIX = "AutoMoE"


@dataclass(frozen=True)
class Kind:
    """One kind of change. `derive(hf_cls)` gives the derived class's (bases, attributes); `owner` is the module
    that registers the kind, imported when a pickled model loads."""

    name: str
    owner: str
    derive: Callable[[type], tuple[tuple[type, ...], dict[str, Any]]]


_KINDS: dict[str, Kind] = {}
_CLASSES: dict[tuple[str, type], type] = {}


def register_kind(name: str, owner: str, derive: Callable[[type], tuple[tuple[type, ...], dict[str, Any]]]) -> str:
    """Register a kind of change (once, at the owner module's import); returns its name."""
    if name in _KINDS and _KINDS[name].owner != owner:
        raise ValueError(f"automoe: the kind {name!r} is registered by {_KINDS[name].owner} already")
    _KINDS[name] = Kind(name, owner, derive)
    return name


def derived_class(kind: str, hf_cls: type) -> type:
    """The class of `kind` derived from `hf_cls`, AutoMoE<hf_cls name>, built once."""
    key = (kind, hf_cls)
    if key not in _CLASSES:
        bases, attrs = _KINDS[kind].derive(hf_cls)
        _CLASSES[key] = type(f"{PREFIX}{hf_cls.__name__}", bases, {
            "__module__": bases[0].__module__, **attrs,
            "__reduce_ex__": _reduce_ex, "automoe_kind": kind, "automoe_hf_class": hf_cls,
        })
    return _CLASSES[key]


def kind_of(module: nn.Module) -> str | None:
    """The kind of change `module`'s class is (None for a class automoe did not derive, or a subclass of one)."""
    return vars(type(module)).get("automoe_kind")


@dataclass(frozen=True)
class Change:
    """A module automoe changed: where it is, the kind of change, and the HF class it derives from."""

    module: str
    kind: str
    hf_class: str


def changes(model: nn.Module) -> list[Change]:
    """Every module of `model` whose class automoe derived, in model order."""
    return [Change(name, kind, type(module).automoe_hf_class.__name__) for name, module in model.named_modules()
            if (kind := kind_of(module)) is not None]


def _reduce_ex(self: object, protocol: int):
    cls = type(self)
    _, _, *state = object.__reduce_ex__(self, max(protocol, 2))
    return (_new_instance, (_KINDS[cls.automoe_kind].owner, cls.automoe_kind, cls.automoe_hf_class), *state)


def _new_instance(owner: str, kind: str, hf_cls: type) -> object:
    importlib.import_module(owner)
    return object.__new__(derived_class(kind, hf_cls))
