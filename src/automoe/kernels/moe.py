"""Routed experts of one device in one autograd Function: permute -> grouped GEMM -> weighted activation ->
grouped GEMM -> unpermute-sum, with a memory-lean backward.

Why a Function instead of composing autograd ops: composed, autograd keeps the permuted tokens [T*k, H], the
gate/up output [T*k, 2I], the activation [T*k, I] and the expert output [T*k, H] of every layer. Here only x
(which the router keeps anyway), the sort order and, up to `RECOMPUTE_ABOVE_TOKENS`, the gate/up output are
kept; the permuted tokens and the activation are recomputed in backward (a gather and one elementwise pass),
and above that size the first GEMM is recomputed too. The routing weight is folded in before the down
projection (see swiglu.py), so the expert output is never kept for d(weight). No host synchronisation:
counts come from scatter_add, offsets from cumsum, both stay on the device.

Biases (GPT-OSS) keep that memory profile. The gate/up bias is added inside the activation kernels, so h is
kept bias-free; its gradient is each expert's sum of d h rows, one [E, S] one-hot GEMM. The down bias is
weighted too, w * (a @ W2 + b2) = (w * a) @ W2 + w * b2, and the second term summed over a token's k copies is
a dense routing matrix R [T, E] (the weights at the chosen experts) times b2: out += R @ b2, d b2 = R^T @ d out,
and d R = d out @ b2^T adds b2 . dy to each copy's d(weight). All three are small GEMMs (E is the inner or outer
size) with no per-row [S, H] copy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..moe.dispatch import sort_by_expert
from ..moe.experts import grouped_mm as _grouped_mm
from ..moe.experts import weight_in_out as _in_out
from ..moe.spec import ExpertsSpec
from .combine import unpermute_sum
from .swiglu import weighted_activation, weighted_activation_backward

# gate/up output kept up to 32k tokens a layer (0.8 GB in bf16 for Qwen3-30B-A3B): recomputing it costs a
# sixth more expert GEMM work, worth it only where memory decides the longest sequence that trains
RECOMPUTE_ABOVE_TOKENS = 32768


def route_order(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, offsets, row expert): the stable sort of the T*k token copies by expert, int32 group ends for
    grouped_mm, and the expert of each sorted row."""
    order, counts, row_expert = sort_by_expert(topk_ids.reshape(-1), num_experts)
    return order, torch.cumsum(counts, dim=0, dtype=torch.int32), row_expert


def expert_of_rows(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The expert of each sorted row from the group ends alone (how many groups end at or before it)."""
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, rows, right=True)


def routing_matrix(
    token_of_row: torch.Tensor, row_expert: torch.Tensor, weights: torch.Tensor, num_tokens: int, num_experts: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """R [T, E]: each token's routing weight at each chosen expert, zero elsewhere (a token picks an expert once)."""
    flat = torch.zeros(num_tokens * num_experts, device=weights.device, dtype=dtype)
    flat.scatter_(0, token_of_row * num_experts + row_expert, weights.to(dtype))
    return flat.view(num_tokens, num_experts)


class RoutedExperts(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]) for gated experts, with or without biases."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, spec, act_fn, mode):
        num_tokens, top_k = topk_ids.shape
        num_experts = gate_up_proj.shape[0]
        order, offsets, row_expert = route_order(topk_ids, num_experts)
        token_of_row = order // top_k
        weights = topk_weights.reshape(-1)[order]
        w1, w2 = _in_out(gate_up_proj, spec), _in_out(down_proj, spec)
        h = _grouped_mm(x[token_of_row].to(w1.dtype), w1, offs=offsets)
        bias = None if gate_up_bias is None else (gate_up_bias, row_expert)
        act = weighted_activation(h, weights, spec, act_fn, mode, bias)
        y = _grouped_mm(act, w2, offs=offsets)
        out = unpermute_sum(y, order, num_tokens, top_k, mode)
        if down_bias is not None:
            routing = routing_matrix(token_of_row, row_expert, weights, num_tokens, num_experts, out.dtype)
            out = torch.addmm(out, routing, down_bias.to(out.dtype))
        keep_h = num_tokens <= RECOMPUTE_ABOVE_TOKENS
        ctx.save_for_backward(
            x, order, offsets, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h if keep_h else None
        )
        ctx.spec, ctx.act_fn, ctx.mode, ctx.top_k = spec, act_fn, mode, top_k
        ctx.weights_dtype = topk_weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, order, offsets, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h = ctx.saved_tensors
        spec, top_k = ctx.spec, ctx.top_k
        num_tokens, num_experts = x.shape[0], gate_up_proj.shape[0]
        token_of_row = order // top_k
        has_bias = gate_up_bias is not None or down_bias is not None
        row_expert = expert_of_rows(offsets, order.numel()) if has_bias else None
        w1, w2 = _in_out(gate_up_proj, spec), _in_out(down_proj, spec)
        xs = x[token_of_row].to(w1.dtype)
        if h is None:
            h = _grouped_mm(xs, w1, offs=offsets)
        dy = grad_out[token_of_row].to(w2.dtype)
        d_act = _grouped_mm(dy, w2.transpose(-2, -1), offs=offsets)
        bias = None if gate_up_bias is None else (gate_up_bias, row_expert)
        dh, d_weights, act = weighted_activation_backward(d_act, h, weights, spec, ctx.act_fn, ctx.mode, bias)
        del d_act
        grad_down = _param_grad(act, dy, offsets, spec)
        del act, dy
        grad_gate_up = _param_grad(xs, dh, offsets, spec)
        del xs
        grad_gate_up_bias = grad_down_bias = None
        if gate_up_bias is not None:
            one_hot = torch.zeros(num_experts, dh.shape[0], device=dh.device, dtype=dh.dtype)
            one_hot.scatter_(0, row_expert[None], 1.0)
            grad_gate_up_bias = (one_hot @ dh).to(gate_up_bias.dtype)
            del one_hot
        if down_bias is not None:
            routing = routing_matrix(token_of_row, row_expert, weights, num_tokens, num_experts, grad_out.dtype)
            grad_down_bias = (routing.t() @ grad_out).to(down_bias.dtype)
            d_routing = grad_out @ down_bias.to(grad_out.dtype).t()
            d_weights = d_weights + d_routing.view(-1)[token_of_row * num_experts + row_expert].float()
        dxs = _grouped_mm(dh, w1.transpose(-2, -1), offs=offsets)
        grad_x = unpermute_sum(dxs, order, num_tokens, top_k, ctx.mode).to(x.dtype)
        grad_weights = torch.empty_like(d_weights).scatter_(0, order, d_weights)
        grad_weights = grad_weights.view(num_tokens, top_k).to(ctx.weights_dtype)
        return (grad_x, None, grad_weights, grad_gate_up, grad_down, grad_gate_up_bias, grad_down_bias,
                None, None, None)


def _param_grad(inputs: torch.Tensor, grads: torch.Tensor, offsets: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """Per-expert inputs^T @ grads, produced directly in the parameter's own layout (no transposed copy)."""
    if spec.transposed:
        return _grouped_mm(inputs.t(), grads, offs=offsets)
    return _grouped_mm(grads.t(), inputs, offs=offsets)


def routed_experts(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: nn.Module, mode: str
) -> torch.Tensor:
    """[T, H] tokens, [T, k] ids and weights, the block's Experts module -> [T, H] weighted sum of experts."""
    spec = experts.spec
    biases = (experts.gate_up_proj_bias, experts.down_proj_bias) if spec.has_bias else (None, None)
    return RoutedExperts.apply(
        x, topk_ids, topk_weights, experts.gate_up_proj, experts.down_proj, *biases, spec, experts.act_fn, mode
    )


def local_routed_fn(mode: str) -> Callable[..., torch.Tensor]:
    """What MoEBlock calls instead of dispatch/experts/combine while its dispatcher is the local one; a partial,
    not a closure, so the model still pickles."""
    return functools.partial(routed_experts, mode=mode)
