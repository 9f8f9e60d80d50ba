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

from ..kernels.combine import combine_rows
from ..kernels.ep_plan import PairPlan, destination_mask, pair_plan, route_counts
from ..moe.dispatch import Dispatched, Dispatcher, expert_rows
from .collectives import all_to_all, register_group


def rows_per_destination(topk_ids: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """[ep_size] int64: the token rows this rank sends to each rank of the ep group (a token once per rank that
    owns any of its experts). What AllToAllDispatcher sends; the performance model counts bytes with it."""
    return destination_mask(topk_ids, num_experts, ep_size).sum(dim=0)


def start_to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """(the tensor on its way to pinned host memory, the event to wait on before reading it); a CPU tensor as it
    is, with no event."""
    if not tensor.is_cuda:
        return tensor, None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


@dataclass
class _Plan:
    """What a layer's dispatch needs that depends only on its routing, built before the host waits for the sizes."""

    pairs: PairPlan
    sizes: torch.Tensor  # pairs.sizes on the host, or on its way there (CUDA)
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
        if num_experts % self.ep_size:
            raise ValueError(f"ep size {self.ep_size} does not divide {num_experts} experts")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size

    def plan(self, topk_ids: torch.Tensor) -> _Plan:
        """Count exchange, then everything else the routing alone decides (kernels.ep_plan: one launch each side
        of the exchange on CUDA); the split sizes start their way to the host (non-blocking, into pinned memory)
        and are read only in dispatch."""
        counts, owns = route_counts(topk_ids, self.num_experts, self.ep_size)
        (received,) = all_to_all([counts], [1] * self.ep_size, [1] * self.ep_size, self.group)
        pairs = pair_plan(topk_ids, owns, counts, received)
        return _Plan(pairs, *start_to_host(pairs.sizes))

    def dispatch(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, plan: _Plan | None = None
    ) -> Dispatched:
        plan = self.plan(topk_ids) if plan is None else plan
        ep, pairs = self.ep_size, plan.pairs
        tokens, weights = hidden[pairs.send_token], topk_weights[pairs.send_token]
        if plan.ready is not None:
            plan.ready.synchronize()  # the layer's one wait for the host, behind the work queued above
        sizes = plan.sizes.tolist()
        send_splits, recv_splits, num_rows = sizes[:ep], sizes[ep : 2 * ep], sizes[-1]
        tokens, slot_expert, weights = all_to_all(
            [tokens, pairs.slot_of_pair, weights], recv_splits, send_splits, self.group)
        rows = expert_rows(slot_expert, weights, self.num_local, num_rows, pairs.offsets)
        num_pairs = sum(send_splits)
        state = (pairs.send_token[:num_pairs], pairs.token_rows[:num_pairs], pairs.token_ptr, send_splits,
                 recv_splits)
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
        return combine_rows(back, send_token, token_rows, token_ptr, "auto")


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
