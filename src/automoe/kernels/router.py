"""Router scores + top-k (+ renormalisation and scaling) in one pass per token row, each way.

The reference `route` runs a softmax, a top-k, a sum, a division, a scale and a cast as separate kernels and
autograd keeps an fp32 [T, E] copy of the probabilities per layer. Here the forward reads the logits once and
writes [T, k] weights, [T, k] int64 ids and one fp32 log-sum-exp per row; the backward recomputes the
probabilities from the logits and that log-sum-exp.

Covers score_func "softmax" (Qwen3-MoE, Mixtral, OLMoE, ...) and "topk_softmax" (GPT-OSS). "sigmoid" routers
(DeepSeek-style grouped choice with a correction bias) stay on the reference `route`.

Top-k order is torch.topk's: descending. Experts are chosen on the logits, which rank them as the
probabilities do; on an exact tie the lower expert index comes first. torch.topk leaves the order of ties
unspecified, and it ranks the fp32 probabilities, where distinct logits can round to equal values (for
example when both underflow to 0): only there can the ids differ from the reference, and the tied weights are
equal then. NaN logits rank above everything, as in torch.topk, so every id stays in [0, E).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..moe.router import route
from ..moe.spec import RouterSpec
from .select import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _route_fwd_kernel(x_ptr, w_ptr, ids_ptr, lse_ptr, experts, top_k, scale, eps,
                          SOFTMAX: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr, K_BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, BLOCK)
        slot = tl.arange(0, K_BLOCK)
        kmask = slot < top_k
        x = tl.load(x_ptr + row * experts + col, mask=col < experts, other=float("-inf")).to(tl.float32)
        key = tl.where(x != x, float("inf"), x)
        avail = col < experts
        ids = tl.zeros((K_BLOCK,), dtype=tl.int32)
        for j in range(top_k):
            best = tl.max(tl.where(avail, key, float("-inf")), axis=0)
            pick = tl.min(tl.where(avail & (key == best), col, BLOCK), axis=0)
            avail = avail & (col != pick)
            ids = tl.where(slot == j, pick, ids)
        top = tl.load(x_ptr + row * experts + ids, mask=kmask, other=float("-inf")).to(tl.float32)
        if SOFTMAX:
            m = tl.max(x, axis=0)
            s = tl.sum(tl.exp(x - m), axis=0)
            w = tl.exp(top - m) / s
            if NORM:
                w = w / (tl.sum(w, axis=0) + eps)
            w = w * scale
            tl.store(lse_ptr + row, m + tl.log(s))
        else:
            e = tl.exp(top - tl.max(top, axis=0))
            w = e / tl.sum(e, axis=0)
        tl.store(w_ptr + row * top_k + slot, w.to(w_ptr.dtype.element_ty), mask=kmask)
        tl.store(ids_ptr + row * top_k + slot, ids.to(tl.int64), mask=kmask)

    @triton.jit
    def _route_bwd_kernel(g_ptr, x_ptr, ids_ptr, lse_ptr, dx_ptr, experts, top_k, scale, eps,
                          SOFTMAX: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr, K_BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, BLOCK)
        slot = tl.arange(0, K_BLOCK)
        kmask = slot < top_k
        ids = tl.load(ids_ptr + row * top_k + slot, mask=kmask, other=0).to(tl.int32)
        g = tl.load(g_ptr + row * top_k + slot, mask=kmask, other=0.0).to(tl.float32)
        top = tl.load(x_ptr + row * experts + ids, mask=kmask, other=float("-inf")).to(tl.float32)
        if SOFTMAX:
            lse = tl.load(lse_ptr + row)
            p_top = tl.exp(top - lse)
            g = g * scale
            if NORM:  # w = p_top / (sum(p_top) + eps)
                denom = tl.sum(p_top, axis=0) + eps
                g = (g - tl.sum(g * p_top, axis=0) / denom) / denom
            # softmax backward, dp = g on the chosen experts and 0 elsewhere: dx = p * (dp - sum(dp * p))
            x = tl.load(x_ptr + row * experts + col, mask=col < experts, other=float("-inf")).to(tl.float32)
            dx = -tl.exp(x - lse) * tl.sum(g * p_top, axis=0)
            picked = p_top * g
        else:  # softmax over the k chosen logits, scattered back to their experts
            e = tl.exp(top - tl.max(top, axis=0))
            w = e / tl.sum(e, axis=0)
            dx = tl.zeros((BLOCK,), dtype=tl.float32)
            picked = w * (g - tl.sum(g * w, axis=0))
        for j in range(top_k):
            here = slot == j
            expert = tl.sum(tl.where(here, ids, 0), axis=0)
            dx += tl.where(col == expert, tl.sum(tl.where(here, picked, 0.0), axis=0), 0.0)
        tl.store(dx_ptr + row * experts + col, dx.to(dx_ptr.dtype.element_ty), mask=col < experts)


def triton_covers(spec: RouterSpec) -> bool:
    """The score functions the kernel implements; sigmoid routers keep the reference."""
    return spec.score_func in ("softmax", "topk_softmax")


def _launch_args(experts: int, top_k: int, softmax: bool, norm: bool) -> dict:
    return dict(SOFTMAX=softmax, NORM=softmax and norm, BLOCK=triton.next_power_of_2(experts),
                K_BLOCK=triton.next_power_of_2(top_k))


# The kernels as custom ops (fake kernels give shapes and dtypes): torch.compile traces one automoe::route_fwd /
# route_bwd node each way instead of the Triton launches, and the profiler and activation checkpointing see them.
# The spec travels as the primitives the kernels read (a custom op takes no dataclass).
@torch.library.custom_op("automoe::route_fwd", mutates_args=())
def _route_fwd(logits: torch.Tensor, top_k: int, softmax: bool, norm: bool, scale: float, eps: float,
               fp32_weights: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [T, k], ids [T, k] int64, fp32 log-sum-exp [T]) of contiguous [T, E] logits."""
    rows, experts = logits.shape
    weights = torch.empty(rows, top_k, device=logits.device, dtype=torch.float32 if fp32_weights else logits.dtype)
    ids = torch.empty(rows, top_k, device=logits.device, dtype=torch.int64)
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows:
        _route_fwd_kernel[(rows,)](logits, weights, ids, lse, experts, top_k, scale, eps,
                                   **_launch_args(experts, top_k, softmax, norm))
    return weights, ids, lse


@_route_fwd.register_fake
def _(logits, top_k, softmax, norm, scale, eps, fp32_weights):
    rows = logits.shape[0]
    return (logits.new_empty(rows, top_k, dtype=torch.float32 if fp32_weights else logits.dtype),
            logits.new_empty(rows, top_k, dtype=torch.int64), logits.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("automoe::route_bwd", mutates_args=())
def _route_bwd(grad_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor,
               softmax: bool, norm: bool, scale: float, eps: float) -> torch.Tensor:
    """d logits [T, E] from d weights [T, k] and what the forward kept (logits, ids, lse)."""
    rows, experts = logits.shape
    top_k = ids.shape[1]
    dx = torch.empty_like(logits)
    if rows:
        _route_bwd_kernel[(rows,)](grad_weights, logits, ids, lse, dx, experts, top_k, scale, eps,
                                   **_launch_args(experts, top_k, softmax, norm))
    return dx


@_route_bwd.register_fake
def _(grad_weights, logits, ids, lse, softmax, norm, scale, eps):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, _, softmax, norm, scale, eps, _ = inputs
    ctx.save_for_backward(logits, output[1], output[2])
    ctx.args = (softmax, norm, scale, eps)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_weights, _grad_ids, _grad_lse):
    logits, ids, lse = ctx.saved_tensors
    return _route_bwd(grad_weights.contiguous(), logits, ids, lse, *ctx.args), None, None, None, None, None, None


_route_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_route(logits: torch.Tensor, spec: RouterSpec, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`route(logits, spec, None)` through the kernel where `mode` and the device allow, else the reference."""
    if not triton_covers(spec):
        raise ValueError(f"the fused router covers softmax and topk_softmax routers, not {spec.score_func!r}")
    if use_triton(mode, logits):
        weights, ids, _ = _route_fwd(logits.contiguous(), spec.top_k, spec.score_func == "softmax",
                                     spec.norm_topk_prob, float(spec.routed_scaling_factor), float(spec.renorm_eps),
                                     spec.score_func == "softmax" and spec.weights_in_fp32)
        return weights, ids
    return route(logits, spec, None)


def fused_route_fn(mode: str) -> Callable[[torch.Tensor, RouterSpec], tuple[torch.Tensor, torch.Tensor]]:
    """What Router.forward calls instead of `route` (set by apply_kernels on routers the kernel covers); a
    partial, not a closure, so the model still pickles."""
    return functools.partial(fused_route, mode=mode)
