"""Expert-parallel dispatch/combine: token copies travel over the `ep` group to the rank owning their expert.

Same interface as automoe.moe.dispatch.LocalDispatcher. Experts are split contiguously (Shard(0)): rank j of
the ep group owns experts [j*E_local, (j+1)*E_local). Every rank runs the same collectives in the same order
whatever its routing (a count exchange, then one all-to-all each way, possibly of zero rows), so a rank whose
tokens reach no expert of some rank cannot hang the others.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..moe.dispatch import Dispatched, sort_by_expert, unsort_weighted_sum

_PAD_ROWS = 16  # received rows are padded up to a multiple of this, with at least one pad row (see dispatch)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class AllToAllDispatcher:
    """Dispatch over the ep process group; the experts see only their rank's tokens, sorted by local expert."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        if num_experts % self.ep_size:
            raise ValueError(f"ep size {self.ep_size} does not divide {num_experts} experts")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size

    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Dispatched:
        num_tokens, top_k = topk_ids.shape
        order, counts, _ = sort_by_expert(topk_ids.reshape(-1), self.num_experts)
        send = hidden[order // top_k]  # sorted by global expert, hence grouped by destination rank
        weights = topk_weights.reshape(-1)[order]
        recv_counts = torch.empty_like(counts)  # [ep, E_local]: rows each source rank sends to each local expert
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        # The one host synchronisation of this layer: all_to_all needs its split sizes on the host.
        sizes = torch.cat([counts.view(self.ep_size, self.num_local).sum(1), recv_counts]).tolist()
        send_splits = sizes[: self.ep_size]
        per_source = sizes[self.ep_size :]
        recv_splits = [sum(per_source[s * self.num_local : (s + 1) * self.num_local]) for s in range(self.ep_size)]
        received = _AllToAll.apply(send, recv_splits, send_splits, self.group)
        # rank-major [source][local expert] -> local-expert-major, without another sync
        total = received.shape[0]
        local_ids = torch.arange(self.num_local, device=hidden.device).repeat(self.ep_size)
        row_ids = torch.repeat_interleave(local_ids, recv_counts, output_size=total)
        row_expert, regroup = torch.sort(row_ids, stable=True)
        # Zero padding rows keep grouped_mm away from an empty input (its CPU backward fails on zero rows). They
        # are counted as rows of the last local expert, so every row is computed and differentiated for real
        # (rows past sum(counts) would get undefined gradients, which expert biases would sum up); combine drops
        # them, so their gradients are exactly zero.
        padded = (total // _PAD_ROWS + 1) * _PAD_ROWS
        tokens = torch.cat([received[regroup], received.new_zeros(padded - total, received.shape[1])])
        row_expert = torch.cat([row_expert, row_expert.new_full((padded - total,), self.num_local - 1)])
        local_counts = recv_counts.view(self.ep_size, self.num_local).sum(0)
        local_counts[-1] += padded - total
        state = (order, weights, num_tokens, top_k, regroup, send_splits, recv_splits)
        return Dispatched(tokens, local_counts, row_expert, state)

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        order, weights, num_tokens, top_k, regroup, send_splits, recv_splits = dispatched.state
        out = expert_out[: regroup.shape[0]]  # drop the padding rows
        rank_major = torch.empty_like(out).index_copy(0, regroup, out)
        back = _AllToAll.apply(rank_major, send_splits, recv_splits, self.group)
        return unsort_weighted_sum(back, order, weights, num_tokens, top_k)
