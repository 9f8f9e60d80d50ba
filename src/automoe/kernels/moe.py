"""Routed experts in one custom op each way (automoe::routed_experts_fwd / _bwd): gather -> grouped GEMM ->
weighted activation -> grouped GEMM -> one-pass sum per token, with a memory-lean backward. It computes on whatever
tokens a dispatcher hands the experts (moe.dispatch): the local tokens, or under expert parallelism the tokens
received from other ranks.

Why one op instead of composing autograd ops: composed, autograd keeps the gathered tokens [S, H], the
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

from ..moe.activations import ACTIVATIONS
from ..moe.dispatch import ExpertRows, expert_of_rows
from ..moe.experts import weight_in_out as _in_out
from ..moe.grouped_mm import grouped_mm as _grouped_mm
from ..moe.lora import LoraFactors, factor_grads, project, project_input_grad
from ..moe.spec import ExpertsSpec
from .combine import gather_sum
from .swiglu import triton_covers, weighted_activation, weighted_activation_backward

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


# Routed experts as two custom ops (fake kernels give shapes and dtypes) under one autograd Function: torch.compile
# traces each op as one node (neither the Triton launches nor the fp32 grouped_mm, whose own fake kernel takes only
# bf16, are traced into), and activation checkpointing and the profiler see automoe::routed_experts_fwd / _bwd
# whichever path runs. The
# spec travels as the primitives it is made of (a custom op takes no dataclass), the activation by its name (nor a
# module): only experts whose activation the kernels name (swiglu.triton_covers) take this path.
def _spec_args(spec: ExpertsSpec) -> tuple:
    """What the ops take of an ExpertsSpec, in their argument order."""
    return (spec.activation, spec.act_name or "", spec.has_gate, spec.interleaved, spec.transposed,
            float(spec.swiglu_alpha), float(spec.swiglu_limit))


def _spec(gate_up_proj: torch.Tensor, activation: str, act_name: str, has_gate: bool, interleaved: bool,
          transposed: bool, alpha: float, limit: float) -> ExpertsSpec:
    """The ExpertsSpec `_spec_args` came from (sizes read off the first projection)."""
    experts, rows, cols = gate_up_proj.shape
    hidden, width = (rows, cols) if transposed else (cols, rows)
    return ExpertsSpec(experts, hidden, width // 2 if has_gate else width, activation, act_name or None, has_gate,
                       interleaved, transposed, swiglu_alpha=alpha, swiglu_limit=limit)


def _absent(like: torch.Tensor) -> torch.Tensor:
    """An op output that has nothing to say (a custom op cannot return None): empty, never read."""
    return like.new_empty(0)


def _keeps_h(token_of_row: torch.Tensor) -> bool:
    return token_of_row.numel() <= RECOMPUTE_ABOVE_ROWS


@torch.library.custom_op("automoe::routed_experts_fwd", mutates_args=())
def _routed_experts_fwd(
    x: torch.Tensor, token_of_row: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor,
    token_rows: torch.Tensor, token_ptr: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
    gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, a1: torch.Tensor | None,
    b1: torch.Tensor | None, a2: torch.Tensor | None, b2: torch.Tensor | None, activation: str, act_name: str,
    has_gate: bool, interleaved: bool, transposed: bool, alpha: float, limit: float, mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [N, H], the gate/up output h kept for backward or empty, the rank-r products low1, low2 or empty)."""
    spec = _spec(gate_up_proj, activation, act_name, has_gate, interleaved, transposed, alpha, limit)
    num_tokens, num_experts = x.shape[0], gate_up_proj.shape[0]
    has_bias = gate_up_bias is not None or down_bias is not None
    row_expert = expert_of_rows(offsets, token_of_row.numel()) if has_bias else None
    w1, w2 = _in_out(gate_up_proj, spec), _in_out(down_proj, spec)
    h, low1 = project(x[token_of_row].to(w1.dtype), w1, a1, b1, offsets)
    bias = None if gate_up_bias is None else (gate_up_bias, row_expert)
    act = weighted_activation(h, weights, spec, ACTIVATIONS.get(act_name), mode, bias)
    y, low2 = project(act, w2, a2, b2, offsets)
    del act
    out = gather_sum(y, token_rows, token_ptr, mode)
    if down_bias is not None:
        routing = routing_matrix(token_of_row, row_expert, weights, num_tokens, num_experts, out.dtype)
        out = torch.addmm(out, routing, down_bias.to(out.dtype))
    kept = [t if t is not None else _absent(x) for t in (h if _keeps_h(token_of_row) else None, low1, low2)]
    return out, *kept


@_routed_experts_fwd.register_fake
def _(x, token_of_row, offsets, weights, token_rows, token_ptr, gate_up_proj, down_proj, gate_up_bias, down_bias,
      a1, b1, a2, b2, activation, act_name, has_gate, interleaved, transposed, alpha, limit, mode):
    rows, dtype = token_of_row.shape[0], gate_up_proj.dtype
    hidden = down_proj.shape[2 if transposed else 1]
    width = gate_up_proj.shape[2 if transposed else 1]
    h = x.new_empty(rows, width, dtype=dtype) if _keeps_h(token_of_row) else _absent(x)
    low1, low2 = (_absent(x) if a is None else x.new_empty(rows, a.shape[-1], dtype=dtype) for a in (a1, a2))
    return x.new_empty(x.shape[0], hidden, dtype=dtype), h, low1, low2


@torch.library.custom_op("automoe::routed_experts_bwd", mutates_args=())
def _routed_experts_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, token_of_row: torch.Tensor, offsets: torch.Tensor,
    weights: torch.Tensor, token_rows: torch.Tensor, token_ptr: torch.Tensor, gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
    a1: torch.Tensor | None, b1: torch.Tensor | None, a2: torch.Tensor | None, b2: torch.Tensor | None,
    low1: torch.Tensor, low2: torch.Tensor, h: torch.Tensor, activation: str, act_name: str, has_gate: bool,
    interleaved: bool, transposed: bool, alpha: float, limit: float, mode: str, needs: list[bool],
) -> list[torch.Tensor]:
    """Gradients of (x, weights, gate_up_proj, down_proj, their biases, a1, b1, a2, b2), each empty where
    `needs` (the same order) asks for none or the input is None. h empty: recomputed here."""
    spec = _spec(gate_up_proj, activation, act_name, has_gate, interleaved, transposed, alpha, limit)
    low1, low2 = (None if a is None else low for a, low in ((a1, low1), (a2, low2)))
    num_tokens, num_experts = x.shape[0], gate_up_proj.shape[0]
    has_bias = gate_up_bias is not None or down_bias is not None
    row_expert = expert_of_rows(offsets, token_of_row.numel()) if has_bias else None
    w1, w2 = _in_out(gate_up_proj, spec), _in_out(down_proj, spec)
    xs = x[token_of_row].to(w1.dtype)
    if not _keeps_h(token_of_row):
        h, _ = project(xs, w1, a1, b1, offsets)
    dy = grad_out[token_of_row].to(w2.dtype)
    # d act needs only dy (and the factors); the activation itself comes back from the activation's backward
    d_act, d_low2 = project_input_grad(dy, w2, a2, b2, offsets)
    bias = None if gate_up_bias is None else (gate_up_bias, row_expert)
    dh, d_weights, act = weighted_activation_backward(d_act, h, weights, spec, mode, bias)
    del d_act, h
    grad_down = _param_grad(act, dy, offsets, spec) if needs[3] else None
    grad_a2, grad_b2 = factor_grads(act, dy, low2, d_low2, offsets)
    del act, dy
    grad_gate_up = _param_grad(xs, dh, offsets, spec) if needs[2] else None
    dxs, d_low1 = project_input_grad(dh, w1, a1, b1, offsets)
    grad_a1, grad_b1 = factor_grads(xs, dh, low1, d_low1, offsets)
    del xs
    grad_gate_up_bias = grad_down_bias = None
    if gate_up_bias is not None and needs[4]:
        one_hot = torch.zeros(num_experts, dh.shape[0], device=dh.device, dtype=dh.dtype)
        one_hot.scatter_(0, row_expert[None], 1.0)
        grad_gate_up_bias = (one_hot @ dh).to(gate_up_bias.dtype)
        del one_hot
    if down_bias is not None:
        routing = routing_matrix(token_of_row, row_expert, weights, num_tokens, num_experts, grad_out.dtype)
        if needs[5]:
            grad_down_bias = (routing.t() @ grad_out).to(down_bias.dtype)
        d_routing = grad_out @ down_bias.to(grad_out.dtype).t()
        d_weights = d_weights + d_routing.view(-1)[token_of_row * num_experts + row_expert].float()
    grad_x = gather_sum(dxs, token_rows, token_ptr, mode).to(x.dtype)
    grads = (grad_x, d_weights.to(weights.dtype), grad_gate_up, grad_down, grad_gate_up_bias, grad_down_bias,
             grad_a1, grad_b1, grad_a2, grad_b2)
    # a fresh tensor for every output: an op's outputs may not alias each other (nor its inputs)
    return [_absent(x) if g is None else g for g in grads]


@_routed_experts_bwd.register_fake
def _(grad_out, x, token_of_row, offsets, weights, token_rows, token_ptr, gate_up_proj, down_proj, gate_up_bias,
      down_bias, a1, b1, a2, b2, low1, low2, h, activation, act_name, has_gate, interleaved, transposed, alpha, limit,
      mode, needs):
    inputs = (x, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, a1, b1, a2, b2)
    wanted = (True, True, needs[2], needs[3], needs[4], down_bias is not None and needs[5], True, True, True, True)
    return [torch.empty_like(t) if t is not None and want else _absent(x) for t, want in zip(inputs, wanted,
                                                                                             strict=True)]


_GRAD_INPUTS = (0, 3, 6, 7, 8, 9, 10, 11, 12, 13)  # the forward's inputs that _routed_experts_bwd returns for


class _RoutedExperts(torch.autograd.Function):
    """The two ops' autograd, as a thin Function rather than register_autograd: custom_op's autograd wrapper fills
    in the schema's defaults at a cost quadratic in the argument count (about 0.4 ms of host time a call for these
    22 arguments, measured on CPU with torch 2.13), where this costs what any Function does. torch.compile traces
    the Function and keeps the ops inside it as single nodes."""

    @staticmethod
    def forward(ctx, *inputs):
        out, *kept = _routed_experts_fwd(*inputs)
        ctx.save_for_backward(*inputs[:14], *kept)
        ctx.spec_args, ctx.mode = inputs[14:21], inputs[21]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        needs = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
        grads = _routed_experts_bwd(grad_out.contiguous(), *saved[:14], saved[15], saved[16], saved[14],
                                    *ctx.spec_args, ctx.mode, needs)
        out = [None] * 22
        for i, grad, need in zip(_GRAD_INPUTS, grads, needs, strict=True):
            out[i] = grad if saved[i] is not None and need else None
        return tuple(out)


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
    if not triton_covers(experts.spec):
        raise ValueError(f"automoe's fused experts name their activation; {experts.spec.act_name!r} is not one of "
                         "them: leave these experts on their composed path (apply_kernels does)")
    return _RoutedExperts.apply(tokens, rows.token_of_row, rows.offsets, rows.weights, rows.token_rows,
                                rows.token_ptr, *tensors, *factors, *_spec_args(experts.spec), mode)


def fused_experts_fn(mode: str) -> Callable[..., torch.Tensor]:
    """What apply_kernels sets as an Experts module's fused_forward; a partial, not a closure, so the model still
    pickles."""
    return functools.partial(routed_experts, mode=mode)
