"""The expert activation with the routing weight folded in: a = w * act(gate) * up, one pass each way.

Folding the top-k weight in before the down projection (w * (a @ W2) == (w * a) @ W2) lets combine be a plain
sum and lets the backward get d(weight) from tensors it already has, so the expert output [T*k, H] is never
kept for it. The Triton kernels cover act(gate) * up for every act in ACT_NAMES (SiLU for Qwen3, Mixtral, OLMoE,
DeepSeek, ...; the GELUs, ReLU and ReLU^2) and GPT-OSS's clamped SwiGLU, on [gate; up] or interleaved gate/up,
and add the gate/up bias of each row's expert on the fly (so the saved gate/up output stays bias-free and no
biased copy is made); experts without a gate (NemotronH) get act(up) the same way. An act_fn recognition could
not name (spec.act_name None) takes the torch reference, which calls the model's own act_fn and recomputes
through autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from ..moe.experts import gated_activation
from ..moe.spec import ACT_NAMES, ExpertsSpec
from .select import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _load_gate_up(h_ptr, bias_ptr, expert_ptr, row, inter, col, mask,
                      INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr):
        """fp32 gate and up (+ this row's expert bias) at columns `col`, and their offsets within a row."""
        if INTERLEAVED:
            gate_col = 2 * col
            up_col = 2 * col + 1
        else:
            gate_col = col
            up_col = inter + col
        g = tl.load(h_ptr + row * 2 * inter + gate_col, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * inter + up_col, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias_row = bias_ptr + tl.load(expert_ptr + row).to(tl.int64) * 2 * inter
            g += tl.load(bias_row + gate_col, mask=mask, other=0.0).to(tl.float32)
            u += tl.load(bias_row + up_col, mask=mask, other=0.0).to(tl.float32)
        return g, u, gate_col, up_col

    @triton.jit
    def _load_up(h_ptr, bias_ptr, expert_ptr, row, inter, col, mask, HAS_BIAS: tl.constexpr):
        """fp32 up projection (+ this row's expert bias) of experts without a gate, at columns `col`."""
        u = tl.load(h_ptr + row * inter + col, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u += tl.load(bias_ptr + tl.load(expert_ptr + row).to(tl.int64) * inter + col, mask=mask,
                         other=0.0).to(tl.float32)
        return u

    @triton.jit
    def _act(g, ACT: tl.constexpr):
        """(act(g), act'(g)) for ACT, the index of the function in ACT_NAMES."""
        if ACT == 0:  # silu
            sig = tl.sigmoid(g)
            f, df = g * sig, sig * (1.0 + g * (1.0 - sig))
        elif ACT == 1:  # gelu (erf)
            cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
            f, df = g * cdf, cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
        elif ACT == 2:  # gelu, tanh approximation; tanh(z) = 2 sigmoid(2z) - 1
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
            d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
            f, df = 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * d_inner
        elif ACT == 3:  # quick_gelu
            sig = tl.sigmoid(1.702 * g)
            f, df = g * sig, sig + 1.702 * g * sig * (1.0 - sig)
        elif ACT == 4:  # relu
            f, df = tl.maximum(g, 0.0), tl.where(g > 0.0, 1.0, 0.0)
        else:  # relu2
            r = tl.maximum(g, 0.0)
            f, df = r * r, 2.0 * r
        return f, df

    @triton.jit
    def _gated(g, u, alpha, limit, CLAMPED: tl.constexpr, ACT: tl.constexpr):
        """(a, da/dgate, da/dup). Clamped (GPT-OSS): a = (clamp(u, -l, l) + 1) * g' * sigmoid(alpha * g') with
        g' = min(g, l); a clamped input gets zero gradient, and a value on the limit keeps it, as torch's clamp."""
        if CLAMPED:
            gc = tl.minimum(g, limit)
            uc = tl.minimum(tl.maximum(u, -limit), limit)
            sig = tl.sigmoid(alpha * gc)
            glu = gc * sig
            a = (uc + 1.0) * glu
            da_dg = tl.where(g <= limit, (uc + 1.0) * (sig + alpha * glu * (1.0 - sig)), 0.0)
            da_du = tl.where((u >= -limit) & (u <= limit), glu, 0.0)
        else:
            act, d_act = _act(g, ACT)
            a = act * u
            da_dg = u * d_act
            da_du = act
        return a, da_dg, da_du

    @triton.jit
    def _weighted_act_fwd_kernel(h_ptr, w_ptr, bias_ptr, expert_ptr, a_ptr, inter, alpha, limit,
                                 INTERLEAVED: tl.constexpr, CLAMPED: tl.constexpr, ACT: tl.constexpr,
                                 GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        w = tl.load(w_ptr + row).to(tl.float32)
        for start in range(0, inter, BLOCK):
            col = start + tl.arange(0, BLOCK)
            mask = col < inter
            if GATED:
                g, u, _, _ = _load_gate_up(h_ptr, bias_ptr, expert_ptr, row, inter, col, mask, INTERLEAVED,
                                           HAS_BIAS)
                a, _, _ = _gated(g, u, alpha, limit, CLAMPED, ACT)
            else:
                a, _ = _act(_load_up(h_ptr, bias_ptr, expert_ptr, row, inter, col, mask, HAS_BIAS), ACT)
            tl.store(a_ptr + row * inter + col, (a * w).to(a_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _weighted_act_bwd_kernel(da_ptr, h_ptr, w_ptr, bias_ptr, expert_ptr, dh_ptr, dw_ptr, a_ptr, inter,
                                 alpha, limit, INTERLEAVED: tl.constexpr, CLAMPED: tl.constexpr,
                                 ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        w = tl.load(w_ptr + row).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, inter, BLOCK):
            col = start + tl.arange(0, BLOCK)
            mask = col < inter
            da = tl.load(da_ptr + row * inter + col, mask=mask, other=0.0).to(tl.float32)
            if GATED:
                g, u, gate_col, up_col = _load_gate_up(
                    h_ptr, bias_ptr, expert_ptr, row, inter, col, mask, INTERLEAVED, HAS_BIAS
                )
                a, da_dg, da_du = _gated(g, u, alpha, limit, CLAMPED, ACT)
                dh_row = dh_ptr + row * 2 * inter
                tl.store(dh_row + gate_col, (da * w * da_dg).to(dh_ptr.dtype.element_ty), mask=mask)
                tl.store(dh_row + up_col, (da * w * da_du).to(dh_ptr.dtype.element_ty), mask=mask)
            else:
                a, da_du = _act(_load_up(h_ptr, bias_ptr, expert_ptr, row, inter, col, mask, HAS_BIAS), ACT)
                tl.store(dh_ptr + row * inter + col, (da * w * da_du).to(dh_ptr.dtype.element_ty), mask=mask)
            dw += da * a
            tl.store(a_ptr + row * inter + col, (a * w).to(a_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + row, tl.sum(dw, axis=0))


def triton_covers(spec: ExpertsSpec) -> bool:
    """The kernels compute exactly the clamped SwiGLU, act(gate) * up and act(up) (no gate) for a named act;
    nothing else."""
    return spec.activation == "clamped_swiglu" or spec.act_name is not None


GateUpBias = tuple[torch.Tensor, torch.Tensor]  # (gate/up bias [E, 2I], the expert of each row [S])


def _biased(h: torch.Tensor, bias: GateUpBias | None) -> torch.Tensor:
    """h in fp32 plus each row's expert bias (the kernels add it the same way, in fp32)."""
    return h.float() if bias is None else h.float() + bias[0].float()[bias[1]]


def weighted_activation_reference(
    h: torch.Tensor, weights: torch.Tensor, spec: ExpertsSpec, act_fn: nn.Module, bias: GateUpBias | None = None
) -> torch.Tensor:
    """[S, 2I], [S] (+ each row's expert bias) -> [S, I]: weights[:, None] * act(gate) * up, computed in fp32 and
    rounded once."""
    return (gated_activation(_biased(h, bias), spec, act_fn) * weights.float()[:, None]).to(h.dtype)


def weighted_activation(
    h: torch.Tensor, weights: torch.Tensor, spec: ExpertsSpec, act_fn: nn.Module, mode: str,
    bias: GateUpBias | None = None,
) -> torch.Tensor:
    """The forward: a [S, I] from h [S, 2I] (bias-free; `bias` is added on the fly) and weights [S]."""
    if not (triton_covers(spec) and use_triton(mode, h)):
        return weighted_activation_reference(h, weights, spec, act_fn, bias)
    rows, inter = h.shape[0], h.shape[1] // (2 if spec.has_gate else 1)
    out = torch.empty(rows, inter, device=h.device, dtype=h.dtype)
    if rows:
        _weighted_act_fwd_kernel[(rows,)](
            h.contiguous(), weights.contiguous(), a_ptr=out, inter=inter, **_kernel_args(spec, bias, inter)
        )
    return out


def _act_and_grad(g: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(g), act'(g)) for a name of ACT_NAMES, in torch: the kernels' `_act`."""
    if name == "silu":
        sig = torch.sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * torch.exp(-0.5 * g * g) * 0.3989422804014327
    if name == "gelu_tanh":
        t = torch.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * d_inner
    if name == "quick_gelu":
        sig = torch.sigmoid(1.702 * g)
        return g * sig, sig + 1.702 * g * sig * (1.0 - sig)
    if name == "relu":
        return g.clamp(min=0.0), (g > 0).to(g.dtype)
    r = g.clamp(min=0.0)
    return r * r, 2.0 * r


def _weighted_activation_backward_reference(
    grad: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, spec: ExpertsSpec, bias: GateUpBias | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' backward in torch, with the derivatives written out: it runs inside the routed-experts custom
    op, below autograd (where autograd.grad sees no graph), and functorch's vjp there fails under any
    TorchDispatchMode active around the backward (an op counter, FlopCounterMode)."""
    h32, w, grad = _biased(h, bias), weights.float()[:, None], grad.float()
    if not spec.has_gate:
        a, da_du = _act_and_grad(h32, spec.act_name)
        return (grad * w * da_du).to(h.dtype), (grad * a).sum(dim=1), (a * w).to(h.dtype)
    g, u = (h32[:, ::2], h32[:, 1::2]) if spec.interleaved else h32.chunk(2, dim=-1)
    if spec.activation == "clamped_swiglu":
        limit, alpha = spec.swiglu_limit, spec.swiglu_alpha
        gc, uc = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
        sig = torch.sigmoid(alpha * gc)
        glu = gc * sig
        a = (uc + 1.0) * glu
        da_dg = torch.where(g <= limit, (uc + 1.0) * (sig + alpha * glu * (1.0 - sig)), 0.0)
        da_du = torch.where((u >= -limit) & (u <= limit), glu, 0.0)
    else:
        act, d_act = _act_and_grad(g, spec.act_name)
        a, da_dg, da_du = act * u, u * d_act, act
    d_gate, d_up = grad * w * da_dg, grad * w * da_du
    dh = torch.stack([d_gate, d_up], dim=-1).flatten(-2) if spec.interleaved else torch.cat([d_gate, d_up], dim=-1)
    return dh.to(h.dtype), (grad * a).sum(dim=1), (a * w).to(h.dtype)


def weighted_activation_backward(
    grad: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, spec: ExpertsSpec, mode: str,
    bias: GateUpBias | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d h [S, 2I], d weights [S] fp32, the recomputed activation [S, I]) from d a [S, I]. d h is also each
    row's gradient of the gate/up bias."""
    if not (triton_covers(spec) and use_triton(mode, h)):
        return _weighted_activation_backward_reference(grad, h, weights, spec, bias)
    rows, inter = h.shape[0], h.shape[1] // (2 if spec.has_gate else 1)
    dh = torch.empty_like(h)
    dw = torch.empty(rows, device=h.device, dtype=torch.float32)
    act = torch.empty(rows, inter, device=h.device, dtype=h.dtype)
    if rows:
        _weighted_act_bwd_kernel[(rows,)](
            grad.contiguous(), h.contiguous(), weights.contiguous(), dh_ptr=dh, dw_ptr=dw, a_ptr=act, inter=inter,
            **_kernel_args(spec, bias, inter),
        )
    return dh, dw, act


def _kernel_args(spec: ExpertsSpec, bias: GateUpBias | None, inter: int) -> dict:
    """What both kernels take from the spec and the bias: alpha, limit, the constexpr switches, and the bias
    pointers (None, a constexpr there, when the experts have no bias)."""
    bias_ptr, expert_ptr = (None, None) if bias is None else (bias[0].contiguous(), bias[1].contiguous())
    return dict(
        bias_ptr=bias_ptr, expert_ptr=expert_ptr, alpha=float(spec.swiglu_alpha), limit=float(spec.swiglu_limit),
        INTERLEAVED=spec.interleaved, CLAMPED=spec.activation == "clamped_swiglu",
        ACT=ACT_NAMES.index(spec.act_name) if spec.act_name else 0, GATED=spec.has_gate, HAS_BIAS=bias is not None,
        BLOCK=min(1024, triton.next_power_of_2(inter)),
    )
