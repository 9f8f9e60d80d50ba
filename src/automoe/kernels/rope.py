"""Rotary position embedding of q and k in one pass forward and one backward (issue 8).

HF's `apply_rotary_pos_emb` runs q*cos + rotate_half(q)*sin as several elementwise passes and a cat, forward
and backward, for q and k separately. Here one Triton program per (batch, position) loads cos/sin once and
rotates every q and k head in fp32, rounding once. Backward is the same rotation by -sin (halves swapped), so
only cos and sin are kept for it.

Scope: only automoe models. Each attention class whose forward calls a module-global `apply_rotary_pos_emb`
that a probe shows computes `rope_reference` gets a derived class (automoe.derived) whose forward is a copy of
HF's reading that name as a dispatcher to rope(). Nothing global changes: plain HF models in the same process
keep calling the original.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable

import torch
from torch import nn

from ..options import KERNEL_MODES
from .select import triton_available, use_triton
from .swap import ForwardSwap

NAME = "apply_rotary_pos_emb"

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(x_ptr, y_ptr, x_row, y_row, sxh, sxd, heads, half, c1, c2, sa, sb,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        d = tl.arange(0, BLOCK_D)
        for h0 in range(0, heads, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            mask = (h < heads)[:, None] & (d < half)[None, :]
            x = x_ptr + x_row + h[:, None] * sxh + d[None, :] * sxd
            x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x + half * sxd, mask=mask, other=0.0).to(tl.float32)
            y = y_ptr + y_row + h[:, None] * (2 * half) + d[None, :]  # output rows are [heads, head_dim]
            tl.store(y, (x1 * c1 - x2 * sa).to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(y + half, (x2 * c2 + x1 * sb).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, seq, half, hq, hk,
                     sqb, sqh, sqs, sqd, skb, skh, sks, skd, scb, scs,
                     BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b, s = pid // seq, pid % seq
        d = tl.arange(0, BLOCK_D)
        mask = d < half
        trig = b * scb + s * scs
        c1 = tl.load(cos_ptr + trig + d, mask=mask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + trig + half + d, mask=mask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + trig + d, mask=mask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + trig + half + d, mask=mask, other=0.0).to(tl.float32)[None, :]
        if BACKWARD:  # the transpose of the forward rotation: -sin, each half taking the other half's sin
            sa, sb = -s2, -s1
        else:
            sa, sb = s1, s2
        _rotate_heads(q_ptr, qo_ptr, b * sqb + s * sqs, pid * hq * 2 * half, sqh, sqd, hq, half,
                      c1, c2, sa, sb, BLOCK_HQ, BLOCK_D)
        _rotate_heads(k_ptr, ko_ptr, b * skb + s * sks, pid * hk * 2 * half, skh, skd, hk, half,
                      c1, c2, sa, sb, BLOCK_HK, BLOCK_D)

    def _rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     dtypes: tuple[torch.dtype, torch.dtype], backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        batch, hq, seq, dim = q.shape
        hk = k.shape[1]
        # [B, H, S, D] over [B, S, H, D] memory: the layout HF's q/k/v already have, which SDPA takes as is and
        # which the q/k norm's backward reads without a copy (not views, so in-place use downstream stays legal)
        q_out, k_out = _triton_layout(q, k, dtypes)
        cos, sin = (t.contiguous().expand(batch, seq, dim) for t in (cos, sin))  # one stride set for both
        if batch * seq:
            block_d = triton.next_power_of_2(dim // 2)
            cap = max(1, 4096 // block_d)
            _rope_kernel[(batch * seq,)](
                q, k, q_out, k_out, cos, sin, seq, dim // 2, hq, hk, *q.stride(), *k.stride(),
                cos.stride(0), cos.stride(1), BACKWARD=backward, BLOCK_HQ=min(triton.next_power_of_2(hq), cap),
                BLOCK_HK=min(triton.next_power_of_2(hk), cap), BLOCK_D=block_d,
            )
        return q_out, k_out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_transposed(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's formula, op for op: q*cos + rotate_half(q)*sin (cos/sin [B, S, D] broadcast over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rope_reference_backward(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             dtypes: tuple[torch.dtype, torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """The transpose of rope_reference's rotation, each gradient in its input's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    grads = (g * cos + _rotate_half_transposed(g * sin) for g in (dq, dk))
    return tuple(g.to(dtype) for g, dtype in zip(grads, dtypes, strict=True))


def _triton_layout(q: torch.Tensor, k: torch.Tensor, dtypes: tuple[torch.dtype, torch.dtype]):
    """Empty tensors of _rope_triton's outputs: [B, H, S, D] over [B, S, H, D] memory, in `dtypes`."""
    (_, hq, seq, dim), hk = q.shape, k.shape[1]
    return (q.new_empty_strided(q.shape, (seq * hq * dim, dim, hq * dim, 1), dtype=dtypes[0]),
            k.new_empty_strided(k.shape, (seq * hk * dim, dim, hk * dim, 1), dtype=dtypes[1]))


# Custom ops (fake kernels give shapes, dtypes and strides): torch.compile, activation checkpointing and the profiler
# see one automoe::rope_fwd / automoe::rope_bwd each, whichever path runs inside. Off the Triton path the fake runs
# the reference itself on fake tensors, which gives its outputs' strides exactly.
@torch.library.custom_op("automoe::rope_fwd", mutates_args=())
def _rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(mode, q):
        return _rope_triton(q, k, cos, sin, (torch.result_type(q, cos), torch.result_type(k, cos)), backward=False)
    return rope_reference(q, k, cos, sin)


@_rope_fwd.register_fake
def _(q, k, cos, sin, mode):
    if use_triton(mode, q):
        return _triton_layout(q, k, (torch.result_type(q, cos), torch.result_type(k, cos)))
    return rope_reference(q, k, cos, sin)


@torch.library.custom_op("automoe::rope_bwd", mutates_args=())
def _rope_bwd(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_dtype: torch.dtype,
              k_dtype: torch.dtype, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(mode, dq):
        return _rope_triton(dq, dk, cos, sin, (q_dtype, k_dtype), backward=True)
    return _rope_reference_backward(dq, dk, cos, sin, (q_dtype, k_dtype))


@_rope_bwd.register_fake
def _(dq, dk, cos, sin, q_dtype, k_dtype, mode):
    if use_triton(mode, dq):
        return _triton_layout(dq, dk, (q_dtype, k_dtype))
    return _rope_reference_backward(dq, dk, cos, sin, (q_dtype, k_dtype))


def _setup_context(ctx, inputs, output) -> None:
    q, k, cos, sin, mode = inputs
    ctx.save_for_backward(cos, sin)
    ctx.mode, ctx.dtypes = mode, (q.dtype, k.dtype)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    return *_rope_bwd(dq, dk, cos, sin, *ctx.dtypes, ctx.mode), None, None, None


_rope_fwd.register_autograd(_backward, setup_context=_setup_context)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, S, D] and k [B, Hk, S, D] (any strides) by cos/sin [B or 1, S, D]."""
    return _rope_fwd(q, k, cos, sin, mode)


def _fusable(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The shapes the probe verified: full-width cos/sin (partial rotary keeps the original path)."""
    tensors = (q, k, cos, sin)
    if any(type(t) is not torch.Tensor or t.device != q.device for t in tensors):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    batch, _, seq, dim = q.shape
    return (k.shape[0] == batch and k.shape[2:] == (seq, dim) and cos.shape[1:] == (seq, dim)
            and cos.shape[0] in (1, batch) and dim % 2 == 0 and q.is_floating_point() and k.dtype == q.dtype
            and sin.dtype == cos.dtype and not (cos.requires_grad or sin.requires_grad))


def _dispatching(original: Callable, mode: str) -> Callable:
    """What the derived forward calls for `apply_rotary_pos_emb`: rope() on the shapes it verified, else HF's."""
    @functools.wraps(original)
    def apply_rotary_pos_emb(*args, **kwargs):
        if len(args) == 4 and kwargs in ({}, {"unsqueeze_dim": 1}) and _fusable(*args):
            return rope(*args, mode)
        return original(*args, **kwargs)

    return apply_rotary_pos_emb


def computes_rope(fn: Callable) -> bool:
    """Run `fn(q, k, cos, sin)` on random fp32 CPU inputs (Hq != Hk) and compare with rope_reference."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, cos, sin = (torch.randn(*shape, generator=gen, device="cpu")  # whatever default device is in force
                      for shape in ((2, 3, 5, 8), (2, 2, 5, 8), (2, 5, 8), (2, 5, 8)))
    try:
        with torch.no_grad():
            got = fn(q, k, cos, sin)
    except Exception:  # another signature or layout: not the function rope() replaces
        return False
    want = rope_reference(q, k, cos, sin)
    return (isinstance(got, tuple) and len(got) == 2
            and all(isinstance(g, torch.Tensor) and g.shape == w.shape and torch.allclose(g, w, rtol=1e-5, atol=1e-6)
                    for g, w in zip(got, want, strict=True)))


def calls_rope(cls: type) -> bool:
    """`cls.forward` calls a module-global `apply_rotary_pos_emb`, the function this module can replace."""
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    return code is not None and NAME in code.co_names


def _accepts(module: nn.Module) -> bool:
    """The forward calls a global apply_rotary_pos_emb that computes rope_reference, under decorators that can be
    copied around a new inner function."""
    cls = type(module)
    original = getattr(inspect.unwrap(cls.forward), "__globals__", {}).get(NAME)
    if not (calls_rope(cls) and callable(original) and computes_rope(original)):
        return False
    try:
        _reading_global(cls.forward, original)
    except TypeError:
        return False
    return True


def _reading_global(fn: Callable, value: Callable) -> Callable:
    """A copy of `fn` whose innermost function (under decorators, e.g. HF's deprecate_kwarg) reads the global
    `apply_rotary_pos_emb` as `value`; each wrapper is copied around the new inner function. The copy's other
    globals are those of the modeling module when the class was derived (a later rebinding there is not seen)."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        # without the module's __name__: torch.compile then guards these globals as their own dict, not the module's
        namespace = {key: item for key, item in fn.__globals__.items() if key != "__name__"}
        new = types.FunctionType(fn.__code__, {**namespace, NAME: value}, fn.__name__, fn.__defaults__, fn.__closure__)
    else:
        new_inner = _reading_global(inner, value)
        cells = fn.__closure__ or ()
        if not any(cell.cell_contents is inner for cell in cells):
            raise TypeError(f"automoe rope: cannot see into the decorator around {fn.__qualname__}")
        closure = tuple(types.CellType(new_inner) if cell.cell_contents is inner else cell for cell in cells)
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    if inner is not None:
        new.__wrapped__ = new_inner
    new.__qualname__ = fn.__qualname__
    return new


def _fused_forward(cls: type) -> Callable:
    """cls.forward, copied per kernels mode so that it calls rope() where it calls `apply_rotary_pos_emb`: the HF
    module's global stays as it is (plain HF models keep it), no flag is read at run time (torch.compile traces
    through), and activation-checkpoint recomputation, which re-runs this forward, takes the fused path too."""
    original = inspect.unwrap(cls.forward).__globals__[NAME]
    forwards = {mode: _reading_global(cls.forward, _dispatching(original, mode))
                for mode in KERNEL_MODES if mode != "off"}

    @functools.wraps(cls.forward)
    def forward(self, *args, **kwargs):
        return forwards[self.automoe_kernels](self, *args, **kwargs)

    return forward


def patch_rope(model: nn.Module, mode: str) -> int:
    """Route every verified attention module's RoPE through rope(); returns how many modules were patched."""
    return SWAP.apply(model, mode)


SWAP = ForwardSwap("rope", __name__, _accepts, _fused_forward)
