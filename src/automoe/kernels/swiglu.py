"""The expert activation with the routing weight folded in: a = w * act(gate) * up, one pass each way.

Folding the top-k weight in before the down projection (w * (a @ W2) == (w * a) @ W2) lets combine be a plain
sum and lets the backward get d(weight) from tensors it already has, so the expert output [T*k, H] is never
kept for it. The Triton kernels cover SwiGLU with SiLU on [gate; up] (Qwen3, Mixtral, OLMoE, DeepSeek, ...);
other activations (GPT-OSS's clamped, interleaved one) take the torch reference, which recomputes through
autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from ..moe.experts import gated_activation
from ..moe.spec import ExpertsSpec
from .select import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_fwd_kernel(h_ptr, w_ptr, a_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        w = tl.load(w_ptr + row).to(tl.float32)
        for start in range(0, inter, BLOCK):
            col = start + tl.arange(0, BLOCK)
            mask = col < inter
            g = tl.load(h_ptr + row * 2 * inter + col, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(h_ptr + row * 2 * inter + inter + col, mask=mask, other=0.0).to(tl.float32)
            a = g * tl.sigmoid(g) * u * w
            tl.store(a_ptr + row * inter + col, a.to(a_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(da_ptr, h_ptr, w_ptr, dh_ptr, dw_ptr, a_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        w = tl.load(w_ptr + row).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, inter, BLOCK):
            col = start + tl.arange(0, BLOCK)
            mask = col < inter
            g = tl.load(h_ptr + row * 2 * inter + col, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(h_ptr + row * 2 * inter + inter + col, mask=mask, other=0.0).to(tl.float32)
            da = tl.load(da_ptr + row * inter + col, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            silu = g * sig
            dw += da * silu * u
            dg = da * w * u * sig * (1.0 + g * (1.0 - sig))
            du = da * w * silu
            tl.store(dh_ptr + row * 2 * inter + col, dg.to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dh_ptr + row * 2 * inter + inter + col, du.to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(a_ptr + row * inter + col, (silu * u * w).to(a_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + row, tl.sum(dw, axis=0))


def triton_covers(spec: ExpertsSpec) -> bool:
    return spec.activation == "swiglu" and spec.act_name == "silu" and not spec.interleaved


def weighted_activation_reference(
    h: torch.Tensor, weights: torch.Tensor, spec: ExpertsSpec, act_fn: nn.Module
) -> torch.Tensor:
    """[S, 2I], [S] -> [S, I]: weights[:, None] * act(gate) * up, computed in fp32 and rounded once."""
    return (gated_activation(h.float(), spec, act_fn) * weights.float()[:, None]).to(h.dtype)


def weighted_activation(
    h: torch.Tensor, weights: torch.Tensor, spec: ExpertsSpec, act_fn: nn.Module, mode: str
) -> torch.Tensor:
    if not (triton_covers(spec) and use_triton(mode, h)):
        return weighted_activation_reference(h, weights, spec, act_fn)
    rows, inter = h.shape[0], h.shape[1] // 2
    out = torch.empty(rows, inter, device=h.device, dtype=h.dtype)
    if rows:
        _swiglu_fwd_kernel[(rows,)](h.contiguous(), weights.contiguous(), out, inter, BLOCK=_block(inter))
    return out


def weighted_activation_backward(
    grad: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, spec: ExpertsSpec, act_fn: nn.Module, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d h [S, 2I], d weights [S] fp32, the recomputed activation [S, I]) from d a [S, I]."""
    if not (triton_covers(spec) and use_triton(mode, h)):
        with torch.enable_grad():
            h_ = h.detach().requires_grad_(True)
            w_ = weights.detach().float().requires_grad_(True)
            act = gated_activation(h_.float(), spec, act_fn)
            out = act * w_[:, None]
            dh, dw = torch.autograd.grad(out, (h_, w_), grad.float())
        return dh.to(h.dtype), dw, out.detach().to(h.dtype)
    rows, inter = h.shape[0], h.shape[1] // 2
    dh = torch.empty_like(h)
    dw = torch.empty(rows, device=h.device, dtype=torch.float32)
    act = torch.empty(rows, inter, device=h.device, dtype=h.dtype)
    if rows:
        _swiglu_bwd_kernel[(rows,)](
            grad.contiguous(), h.contiguous(), weights.contiguous(), dh, dw, act, inter, BLOCK=_block(inter)
        )
    return dh, dw, act


def _block(inter: int) -> int:
    return min(1024, triton.next_power_of_2(inter))
