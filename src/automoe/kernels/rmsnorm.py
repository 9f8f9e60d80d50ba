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


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, mode):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, cols = x2.shape
        if use_triton(mode, x2):
            y = torch.empty_like(x2, dtype=torch.result_type(x2, weight))
            rstd = torch.empty(rows, device=x2.device, dtype=torch.float32)
            if rows:
                tile_rows, block = _tile(cols)
                _rms_fwd_kernel[(triton.cdiv(rows, tile_rows),)](x2, weight, y, rstd, rows, cols, eps, ROWS=tile_rows,
                                                                 BLOCK=block)
        else:
            xf = x2.float()
            rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
            y = weight * (xf * rstd[:, None]).to(x.dtype)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.mode, ctx.shape = mode, shape
        return y.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy = grad.reshape(rows, cols).contiguous()
        if use_triton(ctx.mode, x2):
            programs = max(1, min(rows, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count
                                  if x2.is_cuda else 8))
            per = triton.cdiv(rows, programs)
            dx = torch.empty_like(x2)
            dw_part = torch.empty(programs, cols, device=x2.device, dtype=torch.float32)
            tile_rows, block = _tile(cols)
            _rms_bwd_kernel[(programs,)](dy, x2, weight, rstd, dx, dw_part, rows, cols, per, ROWS=tile_rows,
                                         BLOCK=block)
            dw = dw_part.sum(0)
        else:
            n = x2.float() * rstd[:, None]
            dyf = dy.float()
            dw = (dyf * n.to(x2.dtype).float()).sum(0)
            dn = dyf * weight.float()
            dx = rstd[:, None] * (dn - n * (dn * n).mean(-1, keepdim=True))
        return dx.to(x2.dtype).view(ctx.shape), dw.to(weight.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: str) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps, mode)


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


SWAP = ForwardSwap(__name__, _is_rms_norm, _fused_forward)
