"""Router: logits -> top-k expert ids and weights, for every family's scoring rule (see RouterSpec)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import RouterSpec


def route(
    logits: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (weights, ids) from router logits [T, E]; the torch reference of the routing math."""
    if spec.score_func == "topk_softmax":
        top, ids = torch.topk(logits, spec.top_k, dim=-1)
        return torch.softmax(top, dim=-1, dtype=top.dtype), ids
    if spec.score_func == "softmax":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, spec.top_k, dim=-1)
    else:
        scores = logits.sigmoid()
        choice = scores if correction_bias is None else scores + correction_bias
        if spec.n_group > 1:
            grouped = choice.view(-1, spec.n_group, spec.num_experts // spec.n_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        ids = torch.topk(choice, k=spec.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renorm_eps)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    if not spec.weights_in_fp32:
        weights = weights.to(logits.dtype)
    return weights, ids


def balanced_route(logits: torch.Tensor, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Token i goes to experts (i*k + j) % E with equal weights: for benchmarks that must not depend on
    how a randomly initialised router happens to balance."""
    num_tokens = logits.shape[0]
    slots = torch.arange(num_tokens * spec.top_k, device=logits.device).view(num_tokens, spec.top_k)
    ids = slots % spec.num_experts
    dtype = torch.float32 if spec.weights_in_fp32 else logits.dtype
    weights = torch.full((num_tokens, spec.top_k), 1.0 / spec.top_k, device=logits.device, dtype=dtype)
    return weights, ids


class Router(nn.Module):
    """Returns (router_logits, top-k weights, top-k ids), the tuple HF routers return, so HF's recording of
    router_logits (and the aux loss computed from them) is unchanged."""

    def __init__(self, spec: RouterSpec, balanced: bool = False) -> None:
        nn.Module.__init__(self)
        self.spec = spec
        self.balanced = balanced
        # set by automoe.kernels where its fused score + top-k covers spec: (logits, spec) -> (weights, ids)
        self.fused_route = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.weight.shape[-1])
        weight = self.weight
        bias = self.bias if self.spec.has_bias else None
        if self.spec.logits_in_fp32:
            hidden_states, weight = hidden_states.float(), weight.float()
        logits = F.linear(hidden_states, weight, bias)
        if self.balanced:
            weights, ids = balanced_route(logits, self.spec)
        elif self.fused_route is not None:
            weights, ids = self.fused_route(logits, self.spec)
        else:
            correction = self.e_score_correction_bias if self.spec.has_correction_bias else None
            weights, ids = route(logits, self.spec, correction)
        return logits, weights, ids
