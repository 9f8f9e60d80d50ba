"""Experts: the expert MLPs of one MoE layer, run on tokens already sorted by expert.

Two backends compute the same function: "grouped_mm" (one grouped GEMM per projection over all experts)
and "per_expert" (a plain loop, the reference the tests hold the fast path to).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ExpertsSpec

grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def weight_in_out(weight: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """HF stores [E, out, in] (GPT-OSS: [E, in, out]); grouped_mm multiplies by [E, in, out]."""
    return weight if spec.transposed else weight.transpose(1, 2)


def gated_activation(gate_up: torch.Tensor, spec: ExpertsSpec, act_fn: nn.Module) -> torch.Tensor:
    """[S, 2I] -> [S, I]: act(gate) * up, or GPT-OSS's clamped variant with (up + 1)."""
    if spec.interleaved:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    if spec.activation == "swiglu":
        return act_fn(gate) * up
    gate = gate.clamp(max=spec.swiglu_limit)
    up = up.clamp(min=-spec.swiglu_limit, max=spec.swiglu_limit)
    return (up + 1) * (gate * torch.sigmoid(gate * spec.swiglu_alpha))


class Experts(nn.Module):
    """Holds HF's fused expert tensors under HF's names: gate_up_proj [E, 2I, H] and down_proj [E, H, I]
    ([E, H, 2I] and [E, I, H] when `spec.transposed`), plus gate_up_proj_bias / down_proj_bias."""

    def __init__(self, spec: ExpertsSpec, act_fn: nn.Module, backend: str) -> None:
        nn.Module.__init__(self)
        self.spec = spec
        self.act_fn = act_fn
        self.backend = backend

    @property
    def num_local_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def forward(self, tokens: torch.Tensor, counts: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
        """tokens [S, H] sorted by local expert, counts [E_local] rows per expert, row_expert [S] the
        local expert of each row (used for biases). Rows past sum(counts) are padding: their output is
        undefined on the grouped_mm path, and the dispatcher that added them drops them."""
        w1, w2 = weight_in_out(self.gate_up_proj, self.spec), weight_in_out(self.down_proj, self.spec)
        if self.backend == "grouped_mm":
            return self._grouped(tokens, counts, row_expert, w1, w2)
        return self._per_expert(tokens, counts, w1, w2)

    def _grouped(self, tokens, counts, row_expert, w1, w2) -> torch.Tensor:
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        hidden = grouped_mm(tokens.to(w1.dtype), w1, offs=offsets)
        if self.spec.has_bias:
            hidden = hidden + self.gate_up_proj_bias[row_expert]
        hidden = gated_activation(hidden, self.spec, self.act_fn)
        out = grouped_mm(hidden, w2, offs=offsets)
        if self.spec.has_bias:
            out = out + self.down_proj_bias[row_expert]
        return out

    def _per_expert(self, tokens, counts, w1, w2) -> torch.Tensor:
        pieces, start = [], 0
        for e, n in enumerate(counts.tolist()):
            rows = tokens[start : start + n]
            hidden = rows @ w1[e]
            if self.spec.has_bias:
                hidden = hidden + self.gate_up_proj_bias[e]
            hidden = gated_activation(hidden, self.spec, self.act_fn) @ w2[e]
            if self.spec.has_bias:
                hidden = hidden + self.down_proj_bias[e]
            pieces.append(hidden)
            start += n
        pieces.append(tokens.new_zeros(tokens.shape[0] - start, w2.shape[-1]))
        return torch.cat(pieces)
