"""Expert-parallel dispatch/combine: each token travels once to each rank of the `ep` group that owns any of its
experts, and comes back once from each, already summed over that rank's experts.

Same interface as automoe.moe.dispatch.LocalDispatcher, around the same experts module. Experts are split
contiguously (Shard(0)): rank j of the ep group owns experts [j*E_local, (j+1)*E_local). A token sent to rank j
carries its top-k slots as rank j's local experts (E_local for a slot elsewhere) and its weights, all in one
all-to-all; rank j expands it to the rows of its own experts (moe.dispatch.expert_rows),
and the experts sum those rows per token before the result is sent back. Every rank runs the same collectives in
the same order whatever its routing (a count exchange, then the same all-to-alls, possibly of zero rows), so a
rank whose tokens reach no expert of some rank cannot hang the others. The split sizes all_to_all needs on the
host are copied there right after the count exchange and read after the shared experts and all the routing's
bookkeeping are queued, so the one host wait of a layer does not leave the GPU idle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kernels.combine import GatherSum
from ..moe.dispatch import Dispatched, Dispatcher, expert_rows, token_major
from .collectives import all_to_all, register_group


def destination_mask(topk_ids: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """[T, ep_size] bool: which ranks own at least one expert of each token."""
    owner = topk_ids // (num_experts // ep_size)
    mask = torch.zeros(topk_ids.shape[0], ep_size, dtype=torch.bool, device=topk_ids.device)
    return mask.scatter_(1, owner, True)


def rows_per_destination(topk_ids: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """[ep_size] int64: the token rows this rank sends to each rank of the ep group (a token once per rank that
    owns any of its experts). What AllToAllDispatcher sends; the performance model counts bytes with it."""
    return destination_mask(topk_ids, num_experts, ep_size).sum(dim=0)


@dataclass
class _Plan:
    """What a layer's dispatch needs that depends only on its routing, built before the host waits for the sizes."""

    owns: torch.Tensor  # [T, ep] which ranks each token goes to
    send_token: torch.Tensor  # [ep * T] the token of each (destination, token) pair; the pairs that travel first
    slot_of_pair: torch.Tensor  # [ep * T, k] int32: the slots as the destination's local experts (E_local: elsewhere)
    offsets: torch.Tensor  # [E_local] int32: the group ends of the rows this rank will compute
    token_rows: torch.Tensor  # the CSR of each token's pairs, what combine sums (sized for every pair)
    token_ptr: torch.Tensor
    sizes: torch.Tensor  # [send splits (ep), receive splits (ep), rows to compute (1)], on the host or on its way
    ready: torch.cuda.Event | None  # recorded after the sizes' copy, on CUDA


class AllToAllDispatcher(Dispatcher):
    """Dispatch over the ep process group; the experts see the tokens sent to this rank and their rows.

    A layer runs three all-to-alls forward (the count exchange; each token's hidden state, local expert slots and
    weights in one; the summed outputs back) and two backward. All the work that needs only the routing runs
    before the host waits for the split sizes, so while it waits the GPU still has that work queued, and after it
    the host issues little before the experts' GEMMs.

    With `chunks` > 1 the layer's tokens are split in that many chunks, pipelined: on CUDA the all-to-alls run on
    a communication stream, so a chunk travels while the experts compute on the previous one (autograd runs each
    backward op on its forward op's stream, so the backward pipelines the same way); on CPU the same code runs
    in order.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup, chunks: int = 1) -> None:
        self.chunks = chunks
        self.group = register_group(group)
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(f"ep size {self.ep_size} does not divide {num_experts} experts")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size

    def plan(self, topk_ids: torch.Tensor) -> _Plan:
        """Count exchange, then everything else the routing alone decides; the split sizes start their way to the
        host (non-blocking, into pinned memory) and are read only in dispatch."""
        num_tokens, ep, num_local = topk_ids.shape[0], self.ep_size, self.num_local
        owns = destination_mask(topk_ids, self.num_experts, ep)
        per_expert = torch.zeros(self.num_experts, dtype=torch.int64, device=topk_ids.device)
        per_expert.scatter_add_(0, topk_ids.reshape(-1), torch.ones_like(topk_ids.reshape(-1)))
        # [ep, E_local + 1]: for each destination, rows per expert of its and the token rows sent there
        counts = torch.cat([per_expert.view(ep, num_local), owns.sum(dim=0)[:, None]], dim=1)
        (received,) = all_to_all([counts], [1] * ep, [1] * ep, self.group)
        rows_per_expert = received[:, :-1].sum(dim=0)
        sizes = torch.cat([counts[:, -1], received[:, -1], rows_per_expert.sum().view(1)])
        ready = None
        if sizes.is_cuda:
            sizes = torch.empty(sizes.shape, dtype=sizes.dtype, pin_memory=True).copy_(sizes, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        # (destination, token) pairs, destination-major: the pairs that travel first, each destination's in token order
        pair_order = torch.sort(~owns.t().reshape(-1), stable=True).indices
        send_token = pair_order % num_tokens
        local = topk_ids[send_token] - (pair_order // num_tokens * num_local)[:, None]
        slot_of_pair = torch.where((local >= 0) & (local < num_local), local, num_local).to(torch.int32)
        position = torch.empty_like(pair_order).scatter_(
            0, pair_order, torch.arange(pair_order.numel(), device=pair_order.device))
        token_rows, token_ptr = token_major(owns, position.view(ep, num_tokens).t(), ep * num_tokens)
        offsets = torch.cumsum(rows_per_expert, dim=0, dtype=torch.int32)
        return _Plan(owns, send_token, slot_of_pair, offsets, token_rows, token_ptr, sizes, ready)

    def dispatch(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, plan: _Plan | None = None
    ) -> Dispatched:
        plan = self.plan(topk_ids) if plan is None else plan
        ep = self.ep_size
        tokens, weights = hidden[plan.send_token], topk_weights[plan.send_token]
        if plan.ready is not None:
            plan.ready.synchronize()  # the layer's one wait for the host, behind the work queued above
        sizes = plan.sizes.tolist()
        send_splits, recv_splits, num_rows = sizes[:ep], sizes[ep : 2 * ep], sizes[-1]
        tokens, slot_expert, weights = all_to_all(
            [tokens, plan.slot_of_pair, weights], recv_splits, send_splits, self.group)
        rows = expert_rows(slot_expert, weights, self.num_local, num_rows, plan.offsets)
        num_pairs = sum(send_splits)
        state = (plan.send_token[:num_pairs], plan.token_rows[:num_pairs], plan.token_ptr, send_splits, recv_splits)
        return Dispatched(tokens, rows, state)

    def __call__(self, hidden, topk_ids, topk_weights, experts, side=None):
        if self.chunks == 1:
            return super().__call__(hidden, topk_ids, topk_weights, experts, side)
        pieces = list(zip(*(t.tensor_split(self.chunks) for t in (hidden, topk_ids, topk_weights)), strict=True))
        comm = _CommStream(hidden.device)
        plans = [comm.run(self.plan, ids) for _, ids, _ in pieces]
        side_out = side() if side is not None else None
        pending = comm.run(self.dispatch, *pieces[0], plans[0])
        outs = []
        for i in range(len(pieces)):
            dispatched = comm.wait(pending)
            if i + 1 < len(pieces):
                pending = comm.run(self.dispatch, *pieces[i + 1], plans[i + 1])
            expert_out = experts(dispatched.tokens, dispatched.rows)
            outs.append(comm.run(self.combine, expert_out, dispatched))
        return torch.cat([comm.wait(out) for out in outs]), side_out

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        send_token, token_rows, token_ptr, send_splits, recv_splits = dispatched.state
        (back,) = all_to_all([expert_out], send_splits, recv_splits, self.group)
        return GatherSum.apply(back, send_token, token_rows, token_ptr, "auto")


class _CommStream:
    """Runs work on a side CUDA stream and hands its results back to the compute stream; on CPU, in place."""

    def __init__(self, device: torch.device) -> None:
        self.compute = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.stream = _side_stream(device) if device.type == "cuda" else None

    def run(self, fn, *args):
        if self.stream is None:
            return fn(*args)
        self.stream.wait_stream(self.compute)
        with torch.cuda.stream(self.stream):
            return fn(*args)

    def wait(self, result):
        """`result` (a tensor or a Dispatched) is safe to use on the compute stream."""
        if self.stream is None:
            return result
        self.compute.wait_stream(self.stream)
        tensors = [result] if isinstance(result, torch.Tensor) else [
            *(t for t in vars(result.rows).values()), result.tokens, *result.state[:3]]
        for tensor in tensors:
            tensor.record_stream(self.compute)
        return result


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]
