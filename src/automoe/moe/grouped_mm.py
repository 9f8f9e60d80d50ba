"""torch's grouped GEMM, usable under torch.compile in every dtype it runs in eagerly.

`torch._grouped_mm` runs fp32 and bf16 on CPU, but its fake (meta) kernel, what torch.compile traces with, accepts
only bf16: compiling an fp32 model fails with "Expected inputs of BF16 type". Where the fake kernel would refuse the
inputs, the product goes through `automoe::grouped_mm`, a custom op whose fake kernel gives the output's shape and
dtype for any float dtype and whose eager kernel is torch's own, so compiled and eager runs compute the same thing.
bf16, and every eager call, take torch's op directly (inductor may lower it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_torch_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def _output_shape(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> tuple[int, ...]:
    """The three layouts automoe multiplies: [S, K] x [E, K, N] -> [S, N] (tokens by expert weights),
    [K, S] x [S, N] -> [E, K, N] (per-expert weight gradients), [E, M, K] x [K, S] -> [M, S]."""
    if a.dim() == 2 and b.dim() == 3:
        return a.shape[0], b.shape[2]
    if a.dim() == 2 and b.dim() == 2:
        return offs.shape[0], a.shape[0], b.shape[1]
    if a.dim() == 3 and b.dim() == 2:
        return a.shape[1], b.shape[1]
    raise ValueError(f"automoe grouped_mm: no grouped layout for {a.dim()}D x {b.dim()}D operands")


@torch.library.custom_op("automoe::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _torch_grouped_mm(a, b, offs=offs).contiguous()


@_grouped_mm_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(_output_shape(a, b, offs))


def _setup_context(ctx, inputs, output) -> None:
    a, b, offs = inputs
    if not (a.dim() == 2 and b.dim() == 3):
        raise NotImplementedError("automoe grouped_mm differentiates only [S, K] x [E, K, N] products")
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()  # an expanded gradient (of a sum) has zero strides, which grouped_mm refuses
    grad_a = _grouped_mm_op(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_b = _grouped_mm_op(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm(a, b, offs=offs)` for int32 group ends `offs`, eager or compiled, in any dtype it runs."""
    if torch.compiler.is_compiling() and a.dtype != torch.bfloat16:
        return _grouped_mm_op(a, b, offs)
    return _torch_grouped_mm(a, b, offs=offs)
