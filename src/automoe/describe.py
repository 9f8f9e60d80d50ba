"""`describe(model)`: what a model runs, per kind of module (fused Triton, torch reference, plain HF), and why.

Read off the built model, not off the options: the modules whose class automoe derived (automoe.derived, the one
registry of those changes: MoE blocks, experts, routers, kernel-swapped norms and attention), the routers' and
experts' fused functions, the attention implementation and the instance forward of the fused loss. `summary(model)`
is the one line optimize_model logs at load.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .derived import changes, kind_of
from .families.recognize import Unrecognized, block_spec, find_experts
from .kernels import attention, rmsnorm, rope, swiglu
from .kernels import router as router_kernel
from .kernels.causal_lm import fused_loss_forward
from .kernels.select import interpreting, triton_available
from .moe.block import MoEBlock
from .moe.dispatch import LocalDispatcher
from .moe.router import Router


@dataclass(frozen=True)
class Row:
    kind: str
    path: str
    why: str = ""


def kernel_path(mode: str, tensor: torch.Tensor) -> Row:
    """Which side of kernels/select.py's choice `mode` takes for `tensor` (without raising, unlike use_triton)."""
    if mode in ("torch", "off"):
        return Row("", "torch reference", f"kernels={mode!r}")
    if not triton_available():
        return Row("", "torch reference", "triton is not installed")
    if tensor.is_cuda or interpreting():
        return Row("", "fused Triton")
    if mode == "triton":
        return Row("", "error", f"kernels='triton' needs CUDA tensors, these are on {tensor.device.type}")
    return Row("", "torch reference", f"{tensor.device.type} tensors; the Triton kernels run on CUDA")


def _moe_rows(model: nn.Module, config) -> list[Row]:
    rows = []
    for module in model.modules():
        if isinstance(module, MoEBlock):
            experts = getattr(module, module.spec.experts_attr)
            where = "" if type(module.dispatcher) is LocalDispatcher else f" behind {type(module.dispatcher).__name__}"
            if experts.fused_forward is not None:
                path = kernel_path(experts.fused_forward.keywords["mode"], experts.down_proj)
                rows.append(Row("moe block", f"automoe routed experts (grouped_mm{where}), activation + combine: "
                                f"{path.path}", path.why))
            else:
                why = ("experts_backend='per_expert'" if experts.backend == "per_expert"
                       else "kernels='off'" if swiglu.triton_covers(module.spec.experts)
                       else "no Triton kernel for "
                       + (module.spec.experts.act_name or _unnamed_activation(module.spec.experts.activation)))
                rows.append(Row("moe block", f"automoe experts ({experts.backend}{where}), composed autograd", why))
            if module.spec.router is None:
                router = type(getattr(module, module.spec.router_attr)).__name__
                rows.append(Row("router", f"plain HF {router}, torch", "no automoe router rule reproduces it"))
        elif find_experts(module) is not None:
            try:
                block_spec(module, config)
                why = "automoe is off, or the numerical probe of this block disagreed"
            except Unrecognized as reason:
                why = str(reason)
            rows.append(Row("moe block", f"plain HF {type(module).__name__}", why))
        if isinstance(module, Router):
            if module.balanced:
                rows.append(Row("router", "balanced round-robin", "router='balanced' (benchmarks only)"))
            elif module.fused_route is not None:
                path = kernel_path(module.fused_route.keywords["mode"], module.weight)
                rows.append(Row("router", f"{module.spec.score_func} top-k: {path.path}", path.why))
            else:
                why = ("kernels='off'" if router_kernel.triton_covers(module.spec)
                       else f"the {module.spec.score_func} rule has no fused kernel")
                rows.append(Row("router", f"{module.spec.score_func} top-k: torch", why))
    return rows


def _unnamed_activation(activation: str) -> str:
    if activation == "hf_gate":
        return "the experts' own gate activation (HF's _apply_gate)"
    return "an activation function automoe could not name"


def _swap_rows(model: nn.Module) -> list[Row]:
    rows = []
    for module in model.modules():
        name = type(module).__name__
        kind = kind_of(module)
        if kind == rmsnorm.SWAP.kind:
            path = kernel_path(module.automoe_kernels, module.weight)
            rows.append(Row("rmsnorm", path.path, path.why))
        elif name.endswith("RMSNorm"):
            rows.append(Row("rmsnorm", f"plain HF {name}", "the probe found another formula than "
                            "weight * x * rsqrt(mean(x^2) + eps)"))
        if kind == rope.SWAP.kind:
            path = kernel_path(module.automoe_kernels, next(module.parameters()))
            rows.append(Row("rope", path.path, path.why))
        elif rope.calls_rope(type(module)):
            rows.append(Row("rope", "plain HF apply_rotary_pos_emb",
                            "not the standard full rotation (partial or interleaved rotary), or no such global"))
    return rows


def _model_rows(model: nn.Module) -> list[Row]:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == attention.NAME:
        rows = [Row("attention", "SDPA, cuDNN first (automoe_sdpa)", "then flash, efficient, math where cuDNN refuses")]
    else:
        rows = [Row("attention", f"plain HF {impl}", "automoe moves only sdpa onto automoe_sdpa")]
    forward = vars(model).get("forward")
    if getattr(forward, "__func__", None) is fused_loss_forward:
        path = kernel_path(model.automoe_kernels, model.lm_head.weight)
        why = path.why or "no [tokens, vocab] logits"
        rows.append(Row("loss", f"chunked linear + cross-entropy: {path.path}", why))
    else:
        rows.append(Row("loss", "plain HF logits + cross-entropy", "fused_loss is off or the family cannot take it"))
    return rows


def rows(model: nn.Module) -> list[tuple[Row, int]]:
    """Each distinct (kind, path, why) with how many modules take it, in model order."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    counted = Counter(_moe_rows(model, config) + _swap_rows(model) + _model_rows(model))
    return list(counted.items())


def derived_classes(model: nn.Module) -> list[tuple[str, str, int]]:
    """(class name, kind of change, how many modules) of every class automoe derived in `model`, in model order."""
    counted = Counter((type(model.get_submodule(c.module)).__name__, c.kind) for c in changes(model))
    return [(name, kind, n) for (name, kind), n in counted.items()]


def describe(model: nn.Module) -> str:
    """A table, per kind of module, of the path that runs and why, then the classes automoe gave its modules."""
    family = getattr(model.config, "model_type", "?")
    first = next(model.parameters(), None)
    where = "" if first is None else f", {first.dtype} on {first.device.type}"
    lines = [f"automoe: {type(model).__name__} ({family}{where})"]
    table = rows(model)
    width = max(len(f"{row.kind} x{n}") for row, n in table)
    for row, n in table:
        why = f"  ({row.why})" if row.why else ""
        lines.append(f"  {f'{row.kind} x{n}':<{width}}  {row.path}{why}")
    classes = derived_classes(model)
    if classes:
        lines.append("  classes: " + ", ".join(f"{name} x{n} ({kind})" for name, kind, n in classes))
    return "\n".join(lines)


def summary(model: nn.Module) -> str:
    """describe() in one line: kind, count and path, without the reasons."""
    family = getattr(model.config, "model_type", "?")
    return f"automoe: {family}: " + "; ".join(f"{row.kind} x{n} {row.path}" for row, n in rows(model))
