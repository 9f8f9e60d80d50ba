"""Routed experts in one autograd Function: gather -> grouped GEMM -> weighted activation -> grouped GEMM ->
one-pass sum per token, with a memory-lean backward. It computes on whatever tokens a dispatcher hands the experts
(moe.dispatch): the local tokens, or under expert parallelism the tokens received from other ranks.

Why a Function instead of composing autograd ops: composed, autograd keeps the gathered tokens [S, H], the
gate/up output [S, 2I], the activation [S, I] and the expert output [S, H] of every layer (S = T*k rows locally).
Here only x (the router's input, or the tokens a rank received, which the dispatcher keeps anyway), the rows and,
up to `RECOMPUTE_ABOVE_ROWS`, the gate/up output are kept; the gathered tokens and the activation are recomputed
in backward (a gather and one elementwise pass), and above that size the first GEMM is recomputed too. The
routing weight is folded in before the down projection (see swiglu.py), so the expert output is never kept for
d(weight). No host synchronisation: the rows (moe.dispatch.expert_rows) come from a sort, scatter_add and
cumsum, all on the device.

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

from ..moe.dispatch import ExpertRows, expert_of_rows
from ..moe.experts import weight_in_out as _in_out
from ..moe.grouped_mm import grouped_mm as _grouped_mm
from ..moe.lora import LoraFactors, factor_grads, project, project_input_grad
from ..moe.spec import ExpertsSpec
from .combine import gather_sum
from .swiglu import weighted_activation, weighted_activation_backward

# gate/up output kept up to 256k expert rows a layer (32k tokens at top-8: 0.8 GB in bf16 for Qwen3-30B-A3B):
# recomputing it costs a sixth more expert GEMM work, worth it only where memory decides the longest sequence
RECOMPUTE_ABOVE_ROWS = 32768 * 8


def routing_matrix(
    token_of_row: torch.Tensor, row_expert: torch.Tensor, weights: torch.Tensor, num_tokens: int, num_experts: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """R [N, E]: each token's routing weight at each of its experts, zero elsewhere (a token picks an expert once)."""
    flat = torch.zeros(num_tokens * num_experts, device=weights.device, dtype=dtype)
    flat.scatter_(0, token_of_row * num_experts + row_expert, weights.to(dtype))
    return flat.view(num_tokens, num_experts)


class RoutedExperts(torch.autograd.Function):
    """out[n] = sum over the rows r of token n of w[r] * expert_r(x[n]), for gated experts with or without biases
    and with or without LoRA on each projection (a1, b1 / a2, b2: moe.lora's factors, or None).
    x [N, H]; token_of_row, offsets, weights, token_rows, token_ptr: an ExpertRows. Base tensors that do not
    require grad (frozen under LoRA) get no gradient GEMMs."""

    @staticmethod
    def forward(ctx, x, token_of_row, offsets, weights, token_rows, token_ptr, gate_up_proj, down_proj, gate_up_bias,
                down_bias, a1, b1, a2, b2, spec, act_fn, mode):
        num_tokens, num_experts = x.shape[0], gate_up_proj.shape[0]
        has_bias = gate_up_bias is not None or down_bias is not None
        row_expert = expert_of_rows(offsets, token_of_row.numel()) if has_bias else None
        w1, w2 = _in_out(gate_up_proj, spec), _in_out(down_proj, spec)
        h, low1 = project(x[token_of_row].to(w1.dtype), w1, a1, b1, offsets)
        bias = None if gate_up_bias is None else (gate_up_bias, row_expert)
        act = weighted_activation(h, weights, spec, act_fn, mode, bias)
        y, low2 = project(act, w2, a2, b2, offsets)
        del act
        out = gather_sum(y, token_rows, token_ptr, mode)
        if down_bias is not None:
            routing = routing_matrix(token_of_row, row_expert, weights, num_tokens, num_experts, out.dtype)
            out = torch.addmm(out, routing, down_bias.to(out.dtype))
        keep_h = token_of_row.numel() <= RECOMPUTE_ABOVE_ROWS
        ctx.save_for_backward(x, token_of_row, offsets, weights, token_rows, token_ptr, gate_up_proj, down_proj,
                              gate_up_bias, down_bias, a1, b1, a2, b2, low1, low2, h if keep_h else None)
        ctx.spec, ctx.act_fn, ctx.mode = spec, act_fn, mode
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x, token_of_row, offsets, weights, token_rows, token_ptr, gate_up_proj, down_proj, gate_up_bias, down_bias,
         a1, b1, a2, b2, low1, low2, h) = ctx.saved_tensors
        spec, needs = ctx.spec, ctx.needs_input_grad
        num_tokens, num_experts = x.shape[0], gate_up_proj.shape[0]
        has_bias = gate_up_bias is not None or down_bias is not None
        row_expert = expert_of_rows(offsets, token_of_row.numel()) if has_bias else None
        w1, w2 = _in_out(gate_up_proj, spec), _in_out(down_proj, spec)
        xs = x[token_of_row].to(w1.dtype)
        if h is None:
            h, _ = project(xs, w1, a1, b1, offsets)
        dy = grad_out[token_of_row].to(w2.dtype)
        # d act needs only dy (and the factors); the activation itself comes back from the activation's backward
        d_act, d_low2 = project_input_grad(dy, w2, a2, b2, offsets)
        bias = None if gate_up_bias is None else (gate_up_bias, row_expert)
        dh, d_weights, act = weighted_activation_backward(d_act, h, weights, spec, ctx.act_fn, ctx.mode, bias)
        del d_act, h
        grad_down = _param_grad(act, dy, offsets, spec) if needs[7] else None
        grad_a2, grad_b2 = factor_grads(act, dy, low2, d_low2, offsets)
        del act, dy
        grad_gate_up = _param_grad(xs, dh, offsets, spec) if needs[6] else None
        dxs, d_low1 = project_input_grad(dh, w1, a1, b1, offsets)
        grad_a1, grad_b1 = factor_grads(xs, dh, low1, d_low1, offsets)
        del xs
        grad_gate_up_bias = grad_down_bias = None
        if gate_up_bias is not None and needs[8]:
            one_hot = torch.zeros(num_experts, dh.shape[0], device=dh.device, dtype=dh.dtype)
            one_hot.scatter_(0, row_expert[None], 1.0)
            grad_gate_up_bias = (one_hot @ dh).to(gate_up_bias.dtype)
            del one_hot
        if down_bias is not None:
            routing = routing_matrix(token_of_row, row_expert, weights, num_tokens, num_experts, grad_out.dtype)
            if needs[9]:
                grad_down_bias = (routing.t() @ grad_out).to(down_bias.dtype)
            d_routing = grad_out @ down_bias.to(grad_out.dtype).t()
            d_weights = d_weights + d_routing.view(-1)[token_of_row * num_experts + row_expert].float()
        grad_x = gather_sum(dxs, token_rows, token_ptr, ctx.mode).to(x.dtype)
        return (grad_x, None, None, d_weights.to(weights.dtype), None, None, grad_gate_up, grad_down,
                grad_gate_up_bias, grad_down_bias, grad_a1, grad_b1, grad_a2, grad_b2, None, None, None)


def _param_grad(inputs: torch.Tensor, grads: torch.Tensor, offsets: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """Per-expert inputs^T @ grads, produced directly in the parameter's own layout (no transposed copy)."""
    if spec.transposed:
        return _grouped_mm(inputs.t(), grads, offs=offsets)
    return _grouped_mm(grads.t(), inputs, offs=offsets)


def routed_experts(
    experts: nn.Module, tokens: torch.Tensor, rows: ExpertRows, mode: str,
    lora: tuple[LoraFactors | None, LoraFactors | None] = (None, None),
) -> torch.Tensor:
    """The fused path of an Experts module: [N, H] tokens and their rows -> [N, H] weighted sums of experts;
    `lora`: (gate/up, down) factors of peft's adapters (moe.lora), None where a projection has none."""
    tensors = [experts.local_tensor(n) for n in experts.spec.tensor_names]
    factors = [t for pair in lora for t in (pair or (None, None))]
    return RoutedExperts.apply(tokens, rows.token_of_row, rows.offsets, rows.weights, rows.token_rows,
                               rows.token_ptr, *tensors, *factors, experts.spec, experts.act_fn, mode)


def fused_experts_fn(mode: str) -> Callable[..., torch.Tensor]:
    """What apply_kernels sets as an Experts module's fused_forward; a partial, not a closure, so the model still
    pickles."""
    return functools.partial(routed_experts, mode=mode)
