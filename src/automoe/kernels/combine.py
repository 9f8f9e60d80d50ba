"""Unpermute + sum of routed rows in one pass: out[t] = sum_j rows[position of copy (t, j)].

The composed form gathers the [T*k, H] rows back into token order (a second [T*k, H] tensor, written and read
again) and then sums each token's k rows. At seq 32768 with top-8 that intermediate is 1 GiB per call, twice
per layer (forward output, backward input gradient). Here each program reads its token's k rows and writes the
fp32-accumulated sum once.
"""

from __future__ import annotations

import torch

from .select import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_sum_kernel(rows_ptr, inverse_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < hidden
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            src = tl.load(inverse_ptr + token * TOP_K + j).to(tl.int64)
            acc += tl.load(rows_ptr + src * hidden + col, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * hidden + col, acc.to(out_ptr.dtype.element_ty), mask=mask)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """position[i] = where token copy i sits in `order` (the inverse permutation), on the device."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def unpermute_sum(rows: torch.Tensor, order: torch.Tensor, num_tokens: int, top_k: int, mode: str) -> torch.Tensor:
    """[T*k, H] rows in expert order -> [T, H] in the rows' dtype, each token's k rows summed in fp32."""
    inverse = inverse_order(order)
    if not use_triton(mode, rows):
        return rows[inverse].view(num_tokens, top_k, -1).sum(dim=1)
    rows = rows.contiguous()
    hidden = rows.shape[-1]
    out = torch.empty(num_tokens, hidden, device=rows.device, dtype=rows.dtype)
    block = min(1024, triton.next_power_of_2(hidden))
    if num_tokens:
        _gather_sum_kernel[(num_tokens, triton.cdiv(hidden, block))](rows, inverse, out, hidden, TOP_K=top_k,
                                                                    BLOCK=block)
    return out
