"""RMSNorm forward/backward that keeps only the input and one fp32 rstd per row for backward.

HF's eager RMSNorm upcasts to fp32 and autograd keeps several fp32 copies of the input (for q/k norms over
[T, heads, head_dim] that is 4x the bf16 tensor, per layer). Patched per instance after a probe shows the
module computes weight * (x * rsqrt(mean(x^2) + eps)) (Gemma-style (1 + weight) norms fail the probe and stay).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .select import triton_available, use_triton
from .swap import ForwardSwap

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, rows, cols, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
        col = tl.arange(0, BLOCK)[None, :]
        mask = (row < rows) & (col < cols)
        x = tl.load(x_ptr + row * cols + col, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / cols + eps)
        w = tl.load(w_ptr + col, mask=col < cols, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * cols + col, (x * rstd[:, None] * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + tl.reshape(row, (ROWS,)), rstd, mask=tl.reshape(row < rows, (ROWS,)))

    @triton.jit
    def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, rows, cols, rows_per_program,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        col = tl.arange(0, BLOCK)[None, :]
        w = tl.load(w_ptr + col, mask=col < cols, other=0.0).to(tl.float32)
        dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        start = pid * rows_per_program
        end = tl.minimum(start + rows_per_program, rows)
        for first in range(start, end, ROWS):
            r = first + tl.arange(0, ROWS)
            row = r[:, None].to(tl.int64)
            mask = (row < end) & (col < cols)
            x = tl.load(x_ptr + row * cols + col, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * cols + col, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + r, mask=r < end, other=0.0)[:, None]
            n = x * rstd
            dw += dy * n
            dn = dy * w
            dx = rstd * (dn - n * (tl.sum(dn * n, axis=1)[:, None] / cols))
            tl.store(dx_ptr + row * cols + col, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        flat = tl.arange(0, BLOCK)
        tl.store(dw_ptr + pid * cols + flat, tl.sum(dw, axis=0), mask=flat < cols)

    def _tile(cols: int) -> tuple[int, int]:
        """(rows per tile, padded cols): q/k norms have 128-wide rows, so one row per program or loop step would
        leave most of a warp idle; tiles of about 2048 elements keep every kernel bandwidth-bound."""
        block = triton.next_power_of_2(cols)
        return max(1, 2048 // block), block


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's formula, op for op: normalise in fp32, round to the input dtype, then scale."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


# Custom ops (fake kernels give shapes and dtypes): torch.compile, activation checkpointing and the profiler see one
# automoe::rms_norm_fwd / automoe::rms_norm_bwd each, whichever path runs inside.
@torch.library.custom_op("automoe::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) of contiguous x [rows, cols]: y in x and weight's promoted dtype, one fp32 rstd per row."""
    rows, cols = x.shape
    if use_triton(mode, x):
        y = torch.empty_like(x, dtype=torch.result_type(x, weight))
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        if rows:
            tile_rows, block = _tile(cols)
            _rms_fwd_kernel[(triton.cdiv(rows, tile_rows),)](x, weight, y, rstd, rows, cols, eps, ROWS=tile_rows,
                                                             BLOCK=block)
        return y, rstd
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return weight * (xf * rstd[:, None]).to(x.dtype), rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps, mode):
    return x.new_empty(x.shape, dtype=torch.result_type(x, weight)), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("automoe::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                  mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) from contiguous dy [rows, cols] and what the forward kept (x, weight, rstd)."""
    rows, cols = x.shape
    if use_triton(mode, x):
        programs = max(1, min(rows, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
                              if x.is_cuda else 8))
        per = triton.cdiv(rows, programs)
        dx = torch.empty_like(x)
        dw_part = torch.empty(programs, cols, device=x.device, dtype=torch.float32)
        tile_rows, block = _tile(cols)
        _rms_bwd_kernel[(programs,)](dy, x, weight, rstd, dx, dw_part, rows, cols, per, ROWS=tile_rows, BLOCK=block)
        return dx, dw_part.sum(0).to(weight.dtype)
    n = x.float() * rstd[:, None]
    dyf = dy.float()
    dw = (dyf * n.to(x.dtype).float()).sum(0)
    dn = dyf * weight.float()
    dx = rstd[:, None] * (dn - n * (dn * n).mean(-1, keepdim=True))
    return dx.to(x.dtype), dw.to(weight.dtype)


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, mode):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, mode = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mode = mode


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(grad_y.contiguous(), x, weight, rstd, ctx.mode)
    return dx, dw, None, None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: str) -> torch.Tensor:
    """weight * x / rms(x) over the last dim, keeping only x and one fp32 rstd per row for backward."""
    shape = x.shape
    y, _ = _rms_norm_fwd(x.reshape(-1, shape[-1]).contiguous(), weight, eps, mode)
    return y.view(*shape[:-1], -1)


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def computes_rms_norm(module: nn.Module) -> bool:
    """Run the module on a random probe (fp32 CPU copy) and compare with rms_norm_reference."""
    eps, weight = _eps(module), getattr(module, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    try:  # a shallow copy with its own CPU weight: works whatever device (meta, DTensor) the real weight is on
        probe = copy.copy(module)
        fresh = nn.Parameter(torch.empty(weight.shape[0], device="cpu").uniform_(0.5, 1.5))
        probe._parameters = {**module._parameters, "weight": fresh}
        with torch.no_grad():
            x = torch.randn(3, weight.shape[0], device="cpu")
            got = type(module).forward(probe, x)
            want = rms_norm_reference(x, probe.weight, eps)
    except Exception:  # a module we cannot run on a probe is left as it is
        return False
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def patch_rms_norms(model: nn.Module, mode: str) -> int:
    """Give every verified RMSNorm instance the fused forward (its class gets a subclass; isinstance holds)."""
    return SWAP.apply(model, mode)


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and computes_rms_norm(module)


def _fused_forward(cls: type):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, _eps(self), self.automoe_kernels)

    return forward


SWAP = ForwardSwap("rmsnorm", __name__, _is_rms_norm, _fused_forward)
