"""Dispatch/combine: sort token copies by expert for the experts, then bring them back weighted.

One object with two methods, so the local version here and the expert-parallel all-to-all version in
`automoe.distributed` are interchangeable inside the MoE block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dispatched:
    """What the experts consume (tokens, counts, row_expert) and what combine needs back (state)."""

    tokens: torch.Tensor
    counts: torch.Tensor
    row_expert: torch.Tensor
    state: tuple


def sort_by_expert(
    expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, counts, sorted ids) for flat expert ids, without a host sync (no bincount/nonzero)."""
    sorted_ids, order = torch.sort(expert_ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
    return order, counts, sorted_ids


def unsort_weighted_sum(
    rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, num_tokens: int, top_k: int
) -> torch.Tensor:
    """[T*k, H] rows in `order` -> [T, H]: each token's k rows times their router weights, summed.

    fp32 router weights (Mixtral, DeepSeek) keep the weighted sum in fp32, as HF computes it."""
    weighted = rows * weights.unsqueeze(-1)
    unsorted = torch.empty_like(weighted).index_copy(0, order, weighted)
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1)


class LocalDispatcher:
    """All experts live on this device: a stable sort by expert id, then the inverse permutation."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Dispatched:
        num_tokens, top_k = topk_ids.shape
        order, counts, sorted_ids = sort_by_expert(topk_ids.reshape(-1), self.num_experts)
        tokens = hidden[order // top_k]
        weights = topk_weights.reshape(-1)[order]
        return Dispatched(tokens, counts, sorted_ids, (order, weights, num_tokens, top_k))

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        order, weights, num_tokens, top_k = dispatched.state
        return unsort_weighted_sum(expert_out, order, weights, num_tokens, top_k)
