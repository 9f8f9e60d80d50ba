"""The expert-parallel dispatcher's routing bookkeeping (distributed.dispatch), as two Triton kernels on CUDA.

What a layer's dispatch needs from its routing alone (which ranks each token goes to, how many rows each expert
gets, where each (destination, token) pair sits in the send buffer, each pair's expert slots at its destination,
the CSR that sums a token's returning rows) is some thirty small torch ops. On a GPU their cost is the host's time
to launch them, about a millisecond a layer, on a forward that is already host-bound; here each half (before and
after the count exchange) is one launch of one program that walks the tokens in blocks, carrying running counts
from block to block, so every prefix sum stays inside the program. The torch functions are the reference (and
the path on CPU); both give the same integers.

route_counts(ids [T, k], E, ep) -> counts [ep, E/ep + 1] (rows per expert of each destination, then the token
rows sent there), owns [T, ep] bool.
pair_plan(ids, owns, counts, received, ep) -> PairPlan, `received` being the counts the other ranks sent here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .select import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _route_counts_kernel(ids_ptr, counts_ptr, owns_ptr, num_tokens, K: tl.constexpr, KP: tl.constexpr,
                             E_LOCAL: tl.constexpr, EP: tl.constexpr, EPP: tl.constexpr, BINS: tl.constexpr,
                             BT: tl.constexpr):
        per_expert = tl.zeros([BINS], dtype=tl.int32)
        per_destination = tl.zeros([EPP], dtype=tl.int32)
        dest = tl.arange(0, EPP)
        slot = tl.arange(0, KP)
        for start in range(0, num_tokens, BT):
            token = start + tl.arange(0, BT)
            live = token < num_tokens
            ids = tl.load(ids_ptr + token[:, None] * K + slot[None, :],
                          mask=live[:, None] & (slot[None, :] < K), other=EP * E_LOCAL).to(tl.int32)
            per_expert += tl.histogram(tl.reshape(ids, [BT * KP]), BINS)
            hit = (ids // E_LOCAL)[:, :, None] == dest[None, None, :]
            owns = tl.max(hit.to(tl.int32), axis=1)
            tl.store(owns_ptr + token[:, None] * EP + dest[None, :], owns.to(tl.int1),
                     mask=live[:, None] & (dest[None, :] < EP))
            per_destination += tl.sum(owns, axis=0)
        expert = tl.arange(0, BINS)
        tl.store(counts_ptr + (expert // E_LOCAL) * (E_LOCAL + 1) + expert % E_LOCAL, per_expert.to(tl.int64),
                 mask=expert < EP * E_LOCAL)
        tl.store(counts_ptr + dest * (E_LOCAL + 1) + E_LOCAL, per_destination.to(tl.int64), mask=dest < EP)

    @triton.jit
    def _pair_plan_kernel(ids_ptr, owns_ptr, counts_ptr, received_ptr, send_token_ptr, slot_ptr, token_rows_ptr,
                          token_ptr_ptr, sizes_ptr, offsets_ptr, num_tokens, K: tl.constexpr, KP: tl.constexpr,
                          E_LOCAL: tl.constexpr, ELP: tl.constexpr, EP: tl.constexpr, EPP: tl.constexpr,
                          BT: tl.constexpr):
        dest = tl.arange(0, EPP)
        on = dest < EP
        expert = tl.arange(0, ELP)
        send = tl.load(counts_ptr + dest * (E_LOCAL + 1) + E_LOCAL, mask=on, other=0)
        recv = tl.load(received_ptr + dest * (E_LOCAL + 1) + E_LOCAL, mask=on, other=0)
        rows_in = tl.load(received_ptr + dest[:, None] * (E_LOCAL + 1) + expert[None, :],
                          mask=on[:, None] & (expert[None, :] < E_LOCAL), other=0)
        per_expert = tl.sum(rows_in, axis=0)
        tl.store(offsets_ptr + expert, tl.cumsum(per_expert, 0).to(tl.int32), mask=expert < E_LOCAL)
        tl.store(sizes_ptr + dest, send, mask=on)
        tl.store(sizes_ptr + EP + dest, recv, mask=on)
        tl.store(sizes_ptr + 2 * EP, tl.sum(per_expert, 0))
        dest_start = tl.cumsum(send, 0) - send
        slot = tl.arange(0, KP)
        carry_dest = tl.zeros([EPP], dtype=tl.int64)
        carry_token = tl.full([], 0, tl.int64)
        for start in range(0, num_tokens, BT):
            token = start + tl.arange(0, BT)
            live = token < num_tokens
            owns = tl.load(owns_ptr + token[:, None] * EP + dest[None, :], mask=live[:, None] & on[None, :],
                           other=0).to(tl.int64)
            present = owns > 0
            pos = dest_start[None, :] + carry_dest[None, :] + tl.cumsum(owns, axis=0) - owns
            tl.store(send_token_ptr + pos, tl.broadcast_to(token[:, None].to(tl.int64), [BT, EPP]), mask=present)
            ids = tl.load(ids_ptr + token[:, None] * K + slot[None, :], mask=live[:, None] & (slot[None, :] < K),
                          other=0)
            rel = ids[:, None, :] - (dest * E_LOCAL)[None, :, None]
            local = tl.where((rel >= 0) & (rel < E_LOCAL), rel, E_LOCAL).to(tl.int32)
            tl.store(slot_ptr + pos[:, :, None] * K + slot[None, None, :], local,
                     mask=present[:, :, None] & (slot[None, None, :] < K))
            per_token = tl.sum(owns, axis=1)
            ptr = carry_token + tl.cumsum(per_token, 0) - per_token
            tl.store(token_ptr_ptr + token, ptr, mask=live)
            rank_in_token = tl.cumsum(owns, axis=1) - owns
            tl.store(token_rows_ptr + ptr[:, None] + rank_in_token, pos, mask=present)
            carry_dest += tl.sum(owns, axis=0)
            carry_token += tl.sum(per_token, 0)
        tl.store(token_ptr_ptr + num_tokens, carry_token)


class PairPlan(NamedTuple):
    """sizes [send splits (ep), receive splits (ep), rows to compute (1)] int64; offsets [E_local] int32 (the
    group ends of those rows); send_token [ep*T] (the token of each (destination, token) pair, destination-major,
    the pairs that travel first; the rest are valid token indices that are not sent); slot_of_pair [ep*T, k]
    int32 (each pair's slots as its destination's local experts, E_local where the expert is elsewhere);
    token_rows [ep*T], token_ptr [T+1]: each token's pairs, what the combine sums. Entries past the pairs that
    travel are not defined beyond that."""

    sizes: torch.Tensor
    offsets: torch.Tensor
    send_token: torch.Tensor
    slot_of_pair: torch.Tensor
    token_rows: torch.Tensor
    token_ptr: torch.Tensor


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block(k: int, ep: int) -> int:
    """Tokens per block: the [block, k, ep] comparison tile stays near 4096 elements."""
    return max(16, 4096 // (_pow2(k) * _pow2(ep)))


def destination_mask(topk_ids: torch.Tensor, num_experts: int, ep: int) -> torch.Tensor:
    """[T, ep] bool: which ranks own at least one expert of each token (experts split contiguously)."""
    owner = topk_ids // (num_experts // ep)
    mask = torch.zeros(topk_ids.shape[0], ep, dtype=torch.bool, device=topk_ids.device)
    return mask.scatter_(1, owner, True)


def route_counts(topk_ids: torch.Tensor, num_experts: int, ep: int, mode: str = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, k = topk_ids.shape
    num_local = num_experts // ep
    if use_triton(mode, topk_ids):
        counts = topk_ids.new_empty((ep, num_local + 1))
        owns = torch.empty(num_tokens, ep, dtype=torch.bool, device=topk_ids.device)
        _route_counts_kernel[(1,)](topk_ids.contiguous(), counts, owns, num_tokens, K=k, KP=_pow2(k),
                                   E_LOCAL=num_local, EP=ep, EPP=_pow2(ep), BINS=_pow2(num_experts + 1),
                                   BT=_block(k, ep))
        return counts, owns
    owns = destination_mask(topk_ids, num_experts, ep)
    per_expert = torch.zeros(num_experts, dtype=torch.int64, device=topk_ids.device)
    per_expert.scatter_add_(0, topk_ids.reshape(-1), torch.ones_like(topk_ids.reshape(-1)))
    return torch.cat([per_expert.view(ep, num_local), owns.sum(dim=0)[:, None]], dim=1), owns


def pair_plan(topk_ids: torch.Tensor, owns: torch.Tensor, counts: torch.Tensor, received: torch.Tensor,
              mode: str = "auto") -> PairPlan:
    num_tokens, k = topk_ids.shape
    ep, num_local = counts.shape[0], counts.shape[1] - 1
    pairs = ep * num_tokens
    if use_triton(mode, topk_ids):
        device = topk_ids.device
        sizes = torch.empty(2 * ep + 1, dtype=torch.int64, device=device)
        offsets = torch.empty(num_local, dtype=torch.int32, device=device)
        send_token = torch.zeros(pairs, dtype=torch.int64, device=device)
        slot_of_pair = torch.empty(pairs, k, dtype=torch.int32, device=device)
        token_rows = torch.empty(pairs, dtype=torch.int64, device=device)
        token_ptr = torch.empty(num_tokens + 1, dtype=torch.int64, device=device)
        _pair_plan_kernel[(1,)](topk_ids.contiguous(), owns, counts, received.contiguous(), send_token,
                                slot_of_pair, token_rows, token_ptr, sizes, offsets, num_tokens, K=k, KP=_pow2(k),
                                E_LOCAL=num_local, ELP=_pow2(num_local), EP=ep, EPP=_pow2(ep), BT=_block(k, ep))
        return PairPlan(sizes, offsets, send_token, slot_of_pair, token_rows, token_ptr)
    from ..moe.dispatch import token_major

    rows_per_expert = received[:, :-1].sum(dim=0)
    sizes = torch.cat([counts[:, -1], received[:, -1], rows_per_expert.sum().view(1)])
    # (destination, token) pairs, destination-major: the pairs that travel first, each destination's in token order
    pair_order = torch.sort(~owns.t().reshape(-1), stable=True).indices
    send_token = pair_order % num_tokens
    local = topk_ids[send_token] - (pair_order // num_tokens * num_local)[:, None]
    slot_of_pair = torch.where((local >= 0) & (local < num_local), local, num_local).to(torch.int32)
    position = torch.empty_like(pair_order).scatter_(0, pair_order, torch.arange(pairs, device=pair_order.device))
    token_rows, token_ptr = token_major(owns, position.view(ep, num_tokens).t(), pairs)
    offsets = torch.cumsum(rows_per_expert, dim=0, dtype=torch.int32)
    return PairPlan(sizes, offsets, send_token, slot_of_pair, token_rows, token_ptr)
