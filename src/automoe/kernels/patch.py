"""apply_kernels: the one call optimize_model makes to put automoe's fused kernels into a built model."""

from __future__ import annotations

from torch import nn

from ..moe.experts import Experts
from ..moe.router import Router
from ..options import AutoMoEOptions
from .attention import patch_attention
from .causal_lm import patch_causal_lm
from .moe import fused_experts_fn
from .rmsnorm import patch_rms_norms
from .rope import patch_rope
from .router import fused_route_fn, triton_covers
from .swiglu import triton_covers as experts_covered


def apply_kernels(model: nn.Module, options: AutoMoEOptions) -> dict[str, int]:
    """Fused routed experts in every grouped_mm MoE block (under any dispatcher) whose activation the kernels name,
    fused router top-k, fused RMSNorm and RoPE, cuDNN-first attention and, with `options.fused_loss`, the chunked
    linear + cross-entropy loss.
    Returns what was patched, by kind."""
    mode = options.kernels
    if mode == "off":
        return {}
    done = {"moe_blocks": 0, "routers": 0}
    grouped = options.experts_backend == "grouped_mm"
    for module in model.modules():
        if grouped and isinstance(module, Experts) and experts_covered(module.spec):
            module.fused_forward = fused_experts_fn(mode)
            done["moe_blocks"] += 1
        if isinstance(module, Router) and not module.balanced and triton_covers(module.spec):
            module.fused_route = fused_route_fn(mode)
            done["routers"] += 1
    done["rms_norms"] = patch_rms_norms(model, mode)
    done["rope"] = patch_rope(model, mode)
    done["attention"] = int(patch_attention(model))
    done["fused_loss"] = int(options.fused_loss and patch_causal_lm(model, mode))
    return done
