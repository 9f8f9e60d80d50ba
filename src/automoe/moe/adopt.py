"""Move tensors from an HF module into its automoe replacement without copying them.

The replacement must own the very same tensors under the same names, with the same kind (parameter,
persistent or non-persistent buffer), so that state_dict keys, HF loading and HF saving see no difference.
"""

from __future__ import annotations

from torch import nn

from ..runtime_classes import built_by

_HF_SUBCLASSES: dict[tuple[type, type], type] = {}


def adopt_tensors(dst: nn.Module, src: nn.Module, names: list[str]) -> None:
    """Register `src.<name>` on `dst` for each name, same kind, in `src`'s own order."""
    missing = set(names) - set(src._parameters) - set(src._buffers)
    if missing:
        raise AttributeError(f"{type(src).__name__} has no parameter or buffer named {sorted(missing)}")
    for name, param in src._parameters.items():
        if name in names:
            dst.register_parameter(name, param)
    for name, buffer in src._buffers.items():
        if name in names:
            dst.register_buffer(name, buffer, persistent=name not in src._non_persistent_buffers_set)


def hf_compatible_class(automoe_cls: type[nn.Module], hf_cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of `automoe_cls` that is also an instance of `hf_cls`.

    HF finds modules by class for weight init (`_init_weights`) and for recording outputs such as
    `router_logits`, from which it computes the aux loss. Passing `isinstance(m, hf_cls)` keeps all of that
    working unchanged; automoe's forward comes first in the MRO, and automoe classes call
    `nn.Module.__init__` directly so the HF constructor is never run.
    """
    key = (automoe_cls, hf_cls)
    if key not in _HF_SUBCLASSES:
        _HF_SUBCLASSES[key] = type(
            f"{automoe_cls.__name__}As{hf_cls.__name__}",
            (automoe_cls, hf_cls),
            {"__module__": automoe_cls.__module__, **built_by(hf_compatible_class, automoe_cls, hf_cls)},
        )
    return _HF_SUBCLASSES[key]
