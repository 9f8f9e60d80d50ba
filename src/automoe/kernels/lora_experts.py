"""Routed experts with LoRA adapters on both expert projections, computed on the routed tokens.

peft's `target_parameters` LoRA on a fused expert tensor means W_e + s * B_e A_e for every expert. Forming that
sum costs a copy of the whole expert stack each forward (and its gradient each backward). On the routed rows it is
cheaper: each projection becomes y = x W_e + (x A_e)(s B_e), two extra grouped GEMMs of rank r beside the base
one, and the rank-r products (x A_e) are all that is kept for backward ([rows, r], a few MB a layer).

The factors come in grouped_mm's orientation, already scaled and cast (moe/lora.py builds them from peft's
tensors): a [E, in, r], b [E, r, out], so the adapter of a projection is (x @ a[e]) @ b[e]. autograd carries their
gradients back to peft's own lora_A / lora_B through the views and casts that built them. Base weights that do
not require grad get no gradient GEMMs at all.

`routed_lora_experts_reference` is the same function composed from autograd ops; the tests hold the Function to it
and both to HF + peft.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..moe.experts import gated_activation
from ..moe.experts import grouped_mm as _grouped_mm
from ..moe.experts import weight_in_out as _in_out
from ..moe.spec import ExpertsSpec
from .combine import unpermute_sum
from .moe import RECOMPUTE_ABOVE_TOKENS, _param_grad, expert_of_rows, route_order, routed_experts, routing_matrix
from .swiglu import weighted_activation, weighted_activation_backward

LoraFactors = tuple[torch.Tensor, torch.Tensor]  # (a [E, in, r], b [E, r, out]) with the scaling folded into b


def _project(inputs: torch.Tensor, weight: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None,
             offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs @ W_e + (inputs @ a_e) @ b_e, the rank-r product inputs @ a_e) per expert group of rows."""
    out = _grouped_mm(inputs, weight, offs=offsets)
    if a is None:
        return out, None
    low = _grouped_mm(inputs, a, offs=offsets)
    return out + _grouped_mm(low, b, offs=offsets), low


def _project_backward(grad: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor, a: torch.Tensor | None,
                      b: torch.Tensor | None, low: torch.Tensor | None, offsets: torch.Tensor, spec: ExpertsSpec,
                      weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                                  torch.Tensor | None]:
    """(d inputs, d W in the parameter's layout or None, d a, d b) of `_project` given d out."""
    d_inputs = _grouped_mm(grad, weight.transpose(-2, -1), offs=offsets)
    d_weight = _param_grad(inputs, grad, offsets, spec) if weight_grad else None
    if a is None:
        return d_inputs, d_weight, None, None
    d_low = _grouped_mm(grad, b.transpose(-2, -1), offs=offsets)
    d_b = _grouped_mm(low.t(), grad, offs=offsets)
    d_a = _grouped_mm(inputs.t(), d_low, offs=offsets)
    d_inputs = d_inputs + _grouped_mm(d_low, a.transpose(-2, -1), offs=offsets)
    return d_inputs, d_weight, d_a, d_b


class RoutedLoraExperts(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]), each expert projection carrying a LoRA term."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
                a1, b1, a2, b2, spec, act_fn, mode):
        num_tokens, top_k = topk_ids.shape
        num_experts = gate_up_proj.shape[0]
        order, offsets, row_expert = route_order(topk_ids, num_experts)
        token_of_row = order // top_k
        weights = topk_weights.reshape(-1)[order]
        w1, w2 = _in_out(gate_up_proj, spec), _in_out(down_proj, spec)
        h, low1 = _project(x[token_of_row].to(w1.dtype), w1, a1, b1, offsets)
        bias = None if gate_up_bias is None else (gate_up_bias, row_expert)
        act = weighted_activation(h, weights, spec, act_fn, mode, bias)
        y, low2 = _project(act, w2, a2, b2, offsets)
        del act
        out = unpermute_sum(y, order, num_tokens, top_k, mode)
        if down_bias is not None:
            routing = routing_matrix(token_of_row, row_expert, weights, num_tokens, num_experts, out.dtype)
            out = torch.addmm(out, routing, down_bias.to(out.dtype))
        keep_h = num_tokens <= RECOMPUTE_ABOVE_TOKENS
        ctx.save_for_backward(x, order, offsets, weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
                              a1, b1, a2, b2, low1, low2, h if keep_h else None)
        ctx.spec, ctx.act_fn, ctx.mode, ctx.top_k = spec, act_fn, mode, top_k
        ctx.weights_dtype = topk_weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x, order, offsets, weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
         a1, b1, a2, b2, low1, low2, h) = ctx.saved_tensors
        spec, top_k = ctx.spec, ctx.top_k
        num_tokens, num_experts = x.shape[0], gate_up_proj.shape[0]
        token_of_row = order // top_k
        has_bias = gate_up_bias is not None or down_bias is not None
        row_expert = expert_of_rows(offsets, order.numel()) if has_bias else None
        w1, w2 = _in_out(gate_up_proj, spec), _in_out(down_proj, spec)
        xs = x[token_of_row].to(w1.dtype)
        if h is None:
            h, _ = _project(xs, w1, a1, b1, offsets)
        dy = grad_out[token_of_row].to(w2.dtype)
        # d act needs only dy; the activation itself comes back from the activation's backward
        d_act = _grouped_mm(dy, w2.transpose(-2, -1), offs=offsets)
        if a2 is not None:
            d_low2 = _grouped_mm(dy, b2.transpose(-2, -1), offs=offsets)
            d_act = d_act + _grouped_mm(d_low2, a2.transpose(-2, -1), offs=offsets)
        bias = None if gate_up_bias is None else (gate_up_bias, row_expert)
        dh, d_weights, act = weighted_activation_backward(d_act, h, weights, spec, ctx.act_fn, ctx.mode, bias)
        del d_act, h
        grad_down = _param_grad(act, dy, offsets, spec) if ctx.needs_input_grad[4] else None
        grad_a2 = grad_b2 = None
        if a2 is not None:
            grad_b2 = _grouped_mm(low2.t(), dy, offs=offsets)
            grad_a2 = _grouped_mm(act.t(), d_low2, offs=offsets)
        del act, dy
        dxs, grad_gate_up, grad_a1, grad_b1 = _project_backward(
            dh, xs, w1, a1, b1, low1, offsets, spec, ctx.needs_input_grad[3]
        )
        del xs
        grad_gate_up_bias = grad_down_bias = None
        if gate_up_bias is not None and ctx.needs_input_grad[5]:
            one_hot = torch.zeros(num_experts, dh.shape[0], device=dh.device, dtype=dh.dtype)
            one_hot.scatter_(0, row_expert[None], 1.0)
            grad_gate_up_bias = (one_hot @ dh).to(gate_up_bias.dtype)
            del one_hot
        if down_bias is not None:
            routing = routing_matrix(token_of_row, row_expert, weights, num_tokens, num_experts, grad_out.dtype)
            if ctx.needs_input_grad[6]:
                grad_down_bias = (routing.t() @ grad_out).to(down_bias.dtype)
            d_routing = grad_out @ down_bias.to(grad_out.dtype).t()
            d_weights = d_weights + d_routing.view(-1)[token_of_row * num_experts + row_expert].float()
        grad_x = unpermute_sum(dxs, order, num_tokens, top_k, ctx.mode).to(x.dtype)
        grad_weights = torch.empty_like(d_weights).scatter_(0, order, d_weights)
        grad_weights = grad_weights.view(num_tokens, top_k).to(ctx.weights_dtype)
        return (grad_x, None, grad_weights, grad_gate_up, grad_down, grad_gate_up_bias, grad_down_bias,
                grad_a1, grad_b1, grad_a2, grad_b2, None, None, None)


def routed_lora_experts(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor, biases: tuple[torch.Tensor | None, torch.Tensor | None],
    gate_up_lora: LoraFactors | None, down_lora: LoraFactors | None, spec: ExpertsSpec, act_fn: nn.Module,
    mode: str,
) -> torch.Tensor:
    """[T, H] tokens, [T, k] ids and weights -> [T, H]; `*_lora` None where that projection has no adapter."""
    a1, b1 = gate_up_lora or (None, None)
    a2, b2 = down_lora or (None, None)
    return RoutedLoraExperts.apply(
        x, topk_ids, topk_weights, gate_up_proj, down_proj, *biases, a1, b1, a2, b2, spec, act_fn, mode
    )


def routed_experts_with_adapters(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: nn.Module, mode: str
) -> torch.Tensor:
    """What the MoE block calls for its routed experts: `experts` is automoe's Experts module, or peft's
    ParamWrappers around it; with adapters active, their LoRA is computed on the routed tokens."""
    from ..moe.lora import adapter_factors, split_param_wrappers

    base, wrappers = split_param_wrappers(experts)
    gate_up, down = adapter_factors(wrappers, base.spec, base.gate_up_proj.dtype)
    if gate_up is None and down is None:
        return routed_experts(x, topk_ids, topk_weights, base, mode)
    biases = (base.gate_up_proj_bias, base.down_proj_bias) if base.spec.has_bias else (None, None)
    return routed_lora_experts(x, topk_ids, topk_weights, base.gate_up_proj, base.down_proj, biases, gate_up, down,
                               base.spec, base.act_fn, mode)


def routed_experts_fn(mode: str) -> Callable[..., torch.Tensor]:
    """The block's fused routed-experts call (a partial, not a closure, so the model still pickles)."""
    return functools.partial(routed_experts_with_adapters, mode=mode)


def routed_lora_experts_reference(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor, biases: tuple[torch.Tensor | None, torch.Tensor | None],
    gate_up_lora: LoraFactors | None, down_lora: LoraFactors | None, spec: ExpertsSpec, act_fn: nn.Module,
) -> torch.Tensor:
    """The same function from plain autograd ops (every intermediate kept): what the Function is tested against."""
    num_tokens, top_k = topk_ids.shape
    order, offsets, row_expert = route_order(topk_ids, gate_up_proj.shape[0])
    w1, w2 = _in_out(gate_up_proj, spec), _in_out(down_proj, spec)
    h, _ = _project(x[order // top_k].to(w1.dtype), w1, *(gate_up_lora or (None, None)), offsets)
    if biases[0] is not None:
        h = h + biases[0][row_expert]
    act = gated_activation(h, spec, act_fn)
    y, _ = _project(act, w2, *(down_lora or (None, None)), offsets)
    if biases[1] is not None:
        y = y + biases[1][row_expert]
    y = y * topk_weights.reshape(-1)[order, None].to(y.dtype)
    return torch.empty_like(y).index_copy(0, order, y).view(num_tokens, top_k, -1).sum(dim=1)
