"""The one-pass sum of each token's rows: out[n] = sum of rows[token_rows[token_ptr[n]:token_ptr[n+1]]].

The composed form gathers the rows back into token order (a second [rows, H] tensor, written and read again)
and then sums them. At seq 32768 with top-8 that intermediate is 1 GiB per call, twice per layer (forward
output, backward input gradient). Here each program reads its token's rows and writes the fp32-accumulated sum
once. A token may have any number of rows (under expert parallelism: its experts on one rank, or the ranks it
went to), so the rows are given as a CSR (see moe.dispatch.ExpertRows).
"""

from __future__ import annotations

import torch

from .select import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_sum_kernel(rows_ptr, token_rows_ptr, token_ptr_ptr, out_ptr, hidden, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < hidden
        start = tl.load(token_ptr_ptr + token)
        end = tl.load(token_ptr_ptr + token + 1)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(start, end):
            src = tl.load(token_rows_ptr + j).to(tl.int64)
            acc += tl.load(rows_ptr + src * hidden + col, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * hidden + col, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_sum(rows: torch.Tensor, token_rows: torch.Tensor, token_ptr: torch.Tensor, mode: str) -> torch.Tensor:
    """[S, H] rows -> [N, H] in the rows' dtype, each token's rows summed in fp32."""
    num_tokens, hidden = token_ptr.numel() - 1, rows.shape[-1]
    if not use_triton(mode, rows):
        token_of_slot = torch.repeat_interleave(
            torch.arange(num_tokens, device=rows.device), token_ptr.diff(), output_size=token_rows.numel()
        )
        out = torch.zeros(num_tokens, hidden, device=rows.device, dtype=torch.float32)
        return out.index_add_(0, token_of_slot, rows[token_rows].float()).to(rows.dtype)
    rows = rows.contiguous()
    out = torch.empty(num_tokens, hidden, device=rows.device, dtype=rows.dtype)
    block = min(1024, triton.next_power_of_2(hidden))
    if num_tokens:
        _gather_sum_kernel[(num_tokens, triton.cdiv(hidden, block))](
            rows, token_rows.contiguous(), token_ptr.contiguous(), out, hidden, BLOCK=block
        )
    return out


# The differentiable combine as a custom op (fake kernel: shape and dtype): torch.compile traces it as one node
# whichever path runs, and the profiler and activation checkpointing see automoe::gather_sum.
@torch.library.custom_op("automoe::gather_sum", mutates_args=())
def _gather_sum_op(rows: torch.Tensor, token_of_row: torch.Tensor, token_rows: torch.Tensor, token_ptr: torch.Tensor,
                   mode: str) -> torch.Tensor:
    return gather_sum(rows, token_rows, token_ptr, mode)


@_gather_sum_op.register_fake
def _(rows, token_of_row, token_rows, token_ptr, mode):
    return rows.new_empty(token_ptr.shape[0] - 1, rows.shape[-1])


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _backward(ctx, grad):
    (token_of_row,) = ctx.saved_tensors
    return grad[token_of_row], None, None, None, None


_gather_sum_op.register_autograd(_backward, setup_context=_setup_context)


def combine_rows(rows: torch.Tensor, token_of_row: torch.Tensor, token_rows: torch.Tensor, token_ptr: torch.Tensor,
                 mode: str) -> torch.Tensor:
    """gather_sum with autograd: the gradient of a row is its token's gradient (token_of_row [S])."""
    return _gather_sum_op(rows, token_of_row, token_rows, token_ptr, mode)

