"""Routed experts of one device in one autograd Function: permute -> grouped GEMM -> weighted activation ->
grouped GEMM -> unpermute-sum, with a memory-lean backward.

Why a Function instead of composing autograd ops: composed, autograd keeps the permuted tokens [T*k, H], the
gate/up output [T*k, 2I], the activation [T*k, I] and the expert output [T*k, H] of every layer. Here only x
(which the router keeps anyway), the sort order and, up to `RECOMPUTE_ABOVE_TOKENS`, the gate/up output are
kept; the permuted tokens and the activation are recomputed in backward (a gather and one elementwise pass),
and above that size the first GEMM is recomputed too. The routing weight is folded in before the down
projection (see swiglu.py), so the expert output is never kept for d(weight). No host synchronisation:
counts come from scatter_add, offsets from cumsum, both stay on the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..moe.dispatch import sort_by_expert
from ..moe.experts import grouped_mm as _grouped_mm
from ..moe.experts import weight_in_out as _in_out
from ..moe.spec import ExpertsSpec
from .swiglu import weighted_activation, weighted_activation_backward

RECOMPUTE_ABOVE_TOKENS = 16384


def route_order(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): the stable sort of the T*k token copies by expert, and int32 group ends for grouped_mm."""
    order, counts, _ = sort_by_expert(topk_ids.reshape(-1), num_experts)
    return order, torch.cumsum(counts, dim=0, dtype=torch.int32)


def unpermute_sum(rows: torch.Tensor, order: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """[T*k, H] rows in expert order -> [T, H]: each token's k rows summed (fp32 accumulation)."""
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return rows[inverse].view(num_tokens, top_k, -1).sum(dim=1)


class RoutedExperts(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]) for bias-free gated experts."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, gate_up_proj, down_proj, spec, act_fn, mode):
        num_tokens, top_k = topk_ids.shape
        order, offsets = route_order(topk_ids, gate_up_proj.shape[0])
        token_of_row = order // top_k
        weights = topk_weights.reshape(-1)[order]
        w1, w2 = _in_out(gate_up_proj, spec), _in_out(down_proj, spec)
        h = _grouped_mm(x[token_of_row].to(w1.dtype), w1, offs=offsets)
        act = weighted_activation(h, weights, spec, act_fn, mode)
        y = _grouped_mm(act, w2, offs=offsets)
        out = unpermute_sum(y, order, num_tokens, top_k)
        keep_h = num_tokens <= RECOMPUTE_ABOVE_TOKENS
        ctx.save_for_backward(x, order, offsets, weights, gate_up_proj, down_proj, h if keep_h else None)
        ctx.spec, ctx.act_fn, ctx.mode, ctx.top_k = spec, act_fn, mode, top_k
        ctx.weights_dtype = topk_weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, order, offsets, weights, gate_up_proj, down_proj, h = ctx.saved_tensors
        spec, top_k = ctx.spec, ctx.top_k
        num_tokens = x.shape[0]
        token_of_row = order // top_k
        w1, w2 = _in_out(gate_up_proj, spec), _in_out(down_proj, spec)
        xs = x[token_of_row].to(w1.dtype)
        if h is None:
            h = _grouped_mm(xs, w1, offs=offsets)
        dy = grad_out[token_of_row].to(w2.dtype)
        d_act = _grouped_mm(dy, w2.transpose(-2, -1), offs=offsets)
        dh, d_weights, act = weighted_activation_backward(d_act, h, weights, spec, ctx.act_fn, ctx.mode)
        del d_act
        grad_down = _param_grad(act, dy, offsets, spec)
        del act, dy
        grad_gate_up = _param_grad(xs, dh, offsets, spec)
        del xs
        dxs = _grouped_mm(dh, w1.transpose(-2, -1), offs=offsets)
        grad_x = unpermute_sum(dxs, order, num_tokens, top_k).to(x.dtype)
        grad_weights = torch.empty_like(d_weights).scatter_(0, order, d_weights)
        grad_weights = grad_weights.view(num_tokens, top_k).to(ctx.weights_dtype)
        return grad_x, None, grad_weights, grad_gate_up, grad_down, None, None, None


def _param_grad(inputs: torch.Tensor, grads: torch.Tensor, offsets: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """Per-expert inputs^T @ grads, produced directly in the parameter's own layout (no transposed copy)."""
    if spec.transposed:
        return _grouped_mm(inputs.t(), grads, offs=offsets)
    return _grouped_mm(grads.t(), inputs, offs=offsets)


def fusable(spec: ExpertsSpec) -> bool:
    """The Function covers gated experts without biases (biases take the composed path)."""
    return not spec.has_bias


def routed_experts(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: nn.Module, mode: str
) -> torch.Tensor:
    """[T, H] tokens, [T, k] ids and weights, the block's Experts module -> [T, H] weighted sum of experts."""
    return RoutedExperts.apply(
        x, topk_ids, topk_weights, experts.gate_up_proj, experts.down_proj, experts.spec, experts.act_fn, mode
    )


def local_routed_fn(mode: str) -> Callable[..., torch.Tensor]:
    """What MoEBlock calls instead of dispatch/experts/combine while its dispatcher is the local one."""

    def run(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: nn.Module):
        return routed_experts(x, topk_ids, topk_weights, experts, mode)

    return run
