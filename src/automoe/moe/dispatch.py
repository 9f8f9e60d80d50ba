"""Dispatchers: where the tokens of one MoE layer meet the experts, and how the experts' outputs come back.

A dispatcher's `dispatch(hidden, topk_ids, topk_weights)` hands the experts a `Dispatched`: the tokens they
compute on ([N, H], N tokens the experts' rank holds) and their `ExpertRows` (which token each expert row is,
sorted by local expert, with its routing weight). The experts return [N, H], each token's weighted outputs
summed over its experts on this rank, and `combine(expert_out, dispatched)` brings those back to the [T, H]
tokens of the caller. The local dispatcher here hands the tokens over as they are; the expert-parallel one
(automoe.distributed.dispatch) sends each token once to each rank that owns any of its experts. Calling a
dispatcher runs plan -> side (the shared experts) -> dispatch -> experts -> combine, so a dispatcher that
overlaps communication with compute changes nothing for the block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ExpertRows:
    """The rows the experts compute for N tokens, and where each row's output goes.

    token_of_row [S]: the token of each row, rows sorted by local expert; offsets [E_local] int32: the group
    ends (what grouped_mm takes); weights [S]: each row's routing weight. token_rows [S] and token_ptr [N+1]: the
    rows of token n are token_rows[token_ptr[n]:token_ptr[n+1]], what the one-pass combine reads.
    """

    token_of_row: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor
    token_rows: torch.Tensor
    token_ptr: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.token_ptr.numel() - 1

    def row_expert(self) -> torch.Tensor:
        """The local expert of each row (how many groups end at or before it)."""
        return expert_of_rows(self.offsets, self.token_of_row.numel())


@dataclass
class Dispatched:
    """What the experts consume (tokens [N, H] and their rows) and what combine needs back (state)."""

    tokens: torch.Tensor
    rows: ExpertRows
    state: tuple = ()


def expert_of_rows(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, rows, right=True)


def token_major(present: torch.Tensor, position: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_rows, token_ptr) of the CSR that lists each token's rows: present [N, k] marks the slots that are
    rows, position [N, k] where each slot's row sits. No host sync: absent slots are scattered to a dropped end."""
    counts = present.sum(dim=1)
    token_ptr = torch.zeros(present.shape[0] + 1, dtype=torch.int64, device=present.device)
    torch.cumsum(counts, dim=0, out=token_ptr[1:])
    flat = present.reshape(-1)
    slot = torch.where(flat, torch.cumsum(flat, dim=0) - 1, num_rows)
    token_rows = position.new_empty(num_rows + 1).scatter_(0, slot, position.reshape(-1))
    return token_rows[:num_rows], token_ptr


def _sort_key_dtype(num_experts: int) -> torch.dtype:
    """The narrowest integer type holding 0..num_experts: a radix sort makes one pass per key byte, so sorting
    uint8 keys costs the host half the launches of int64 ones (measured: benchmarks/ep_host_costs.py)."""
    return torch.uint8 if num_experts < 256 else torch.int16 if num_experts < 32768 else torch.int64


def expert_rows(
    slot_expert: torch.Tensor, slot_weight: torch.Tensor, num_experts: int, num_rows: int,
    offsets: torch.Tensor | None = None,
) -> ExpertRows:
    """ExpertRows from each token's k slots: slot_expert [N, k] the local expert of each slot, `num_experts` for
    a slot whose expert is elsewhere (it makes no row); slot_weight [N, k]. num_rows: how many slots are rows
    (N * k when every expert is local; then the CSR is built without the scatter, fewer launches on the
    host-bound forward), known on the host. offsets: the group ends, where the caller already has them (the
    expert-parallel dispatcher, from its count exchange). The sort is stable, so rows of one expert keep token
    order. No host sync."""
    num_tokens, top_k = slot_expert.shape
    flat = slot_expert.reshape(-1)
    order = torch.sort(flat.to(_sort_key_dtype(num_experts)), stable=True).indices
    if offsets is None:
        counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
        offsets = torch.cumsum(counts[:num_experts], dim=0, dtype=torch.int32)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=flat.device))
    if num_rows == flat.numel():  # every slot is a row (all experts here): a token's rows are its k slots
        token_rows, token_ptr = position, torch.arange(0, num_rows + 1, top_k, device=flat.device)
    else:
        token_rows, token_ptr = token_major(slot_expert < num_experts, position.view(num_tokens, top_k), num_rows)
    order = order[:num_rows]
    return ExpertRows(order // top_k, offsets, slot_weight.reshape(-1)[order], token_rows, token_ptr)


class Dispatcher:
    """plan + dispatch + combine around the experts; `__call__` is what the MoE block runs.

    plan(topk_ids) is the work that needs only the routing (an expert-parallel dispatcher exchanges counts there
    and starts copying split sizes to the host); `side` runs after it, so that copy is hidden behind the shared
    experts instead of stalling the stream."""

    def plan(self, topk_ids: torch.Tensor) -> object:
        return None

    def dispatch(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, plan: object = None
    ) -> Dispatched:
        raise NotImplementedError

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: nn.Module,
        side: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(routed output [T, H], side() or None)."""
        plan = self.plan(topk_ids)
        side_out = side() if side is not None else None
        dispatched = self.dispatch(hidden, topk_ids, topk_weights, plan)
        return self.combine(experts(dispatched.tokens, dispatched.rows), dispatched), side_out


class LocalDispatcher(Dispatcher):
    """All experts live on this device: the experts get the tokens themselves, and the rows sorted by expert."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, plan: object = None
    ) -> Dispatched:
        return Dispatched(hidden, expert_rows(topk_ids, topk_weights, self.num_experts, topk_ids.numel()))

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        return expert_out
