"""Move tensors from an HF module into its automoe replacement without copying them; the replacement's class.

The replacement must own the very same tensors under the same names, with the same kind (parameter,
persistent or non-persistent buffer), so that state_dict keys, HF loading and HF saving see no difference.
"""

from __future__ import annotations

from torch import nn

from ..derived import derived_class, register_kind
from .block import MoEBlock
from .experts import Experts
from .router import Router


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


def _hf_compatible(automoe_cls: type[nn.Module]):
    def derive(hf_cls: type) -> tuple[tuple[type, ...], dict]:
        return (automoe_cls, hf_cls), {}

    return derive


# HF finds modules by class for weight init (`_init_weights`) and for recording outputs such as `router_logits`, from
# which it computes the aux loss: a replacement that is an instance of the HF class keeps all of that working. The
# automoe class comes first in the MRO, and automoe classes call `nn.Module.__init__` directly, so the HF constructor
# is never run.
_KINDS = {automoe_cls: register_kind(kind, __name__, _hf_compatible(automoe_cls))
          for kind, automoe_cls in (("moe block", MoEBlock), ("experts", Experts), ("router", Router))}


def hf_compatible_class(automoe_cls: type[nn.Module], hf_cls: type[nn.Module]) -> type[nn.Module]:
    """The derived class (automoe_cls, hf_cls), AutoMoE<hf_cls name>, that replaces an `hf_cls` module."""
    return derived_class(_KINDS[automoe_cls], hf_cls)
