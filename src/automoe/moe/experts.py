"""Experts: the expert MLPs of one MoE layer, computed on the tokens a dispatcher hands them.

The one interface every dispatcher wraps (local or expert-parallel): `experts(tokens [N, H], rows)` returns [N, H],
each token's outputs of its experts here times their routing weights, summed. `rows` (moe.dispatch.ExpertRows)
says which token each expert row is, rows sorted by local expert. Paths: the fused custom ops of
automoe.kernels (set in `fused_forward` by apply_kernels), or composed autograd ops with one grouped GEMM per
projection ("grouped_mm") or a plain loop over experts ("per_expert", the reference the tests hold the fast
paths to). Under expert parallelism the tensors are DTensors Shard(0) over `ep`; the forward computes on their
local shards (`local_tensor`), so their gradients come back as DTensors with the same placements.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .dispatch import ExpertRows
from .spec import ExpertsSpec


def weight_in_out(weight: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """HF stores [E, out, in] (GPT-OSS: [E, in, out]); grouped_mm multiplies by [E, in, out]."""
    return weight if spec.transposed else weight.transpose(1, 2)


def gated_activation(gate_up: torch.Tensor, spec: ExpertsSpec, act_fn: nn.Module) -> torch.Tensor:
    """[S, 2I] -> [S, I]: act(gate) * up, or GPT-OSS's clamped variant with (up + 1); [S, I] -> act(up) for
    experts without a gate; HF's own gate function (an HFGate as act_fn) for spec.activation "hf_gate"."""
    if not spec.has_gate or spec.activation == "hf_gate":
        return act_fn(gate_up)
    if spec.interleaved:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    if spec.activation == "swiglu":
        return act_fn(gate) * up
    gate = gate.clamp(max=spec.swiglu_limit)
    up = up.clamp(min=-spec.swiglu_limit, max=spec.swiglu_limit)
    return (up + 1) * (gate * torch.sigmoid(gate * spec.swiglu_alpha))


class HFGate(nn.Module):
    """An HF experts class's own `_apply_gate` ([S, 2I] -> [S, I]) for a gate activation automoe has no rule for,
    run as transformers' grouped_mm backend runs it. It is called on a copy of the HF experts module that holds
    none of their tensors (kept unregistered, so neither weight init nor state_dict sees it): the experts' tensors
    live in automoe's Experts only, and sharding them frees the originals."""

    def __init__(self, hf_experts: nn.Module) -> None:
        nn.Module.__init__(self)
        shell = copy.copy(hf_experts)
        for slot in ("_parameters", "_buffers"):
            object.__setattr__(shell, slot, {})
        object.__setattr__(shell, "_modules", dict(hf_experts._modules))
        object.__setattr__(self, "hf_experts", shell)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.hf_experts._apply_gate(gate_up)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class Experts(nn.Module):
    """Holds HF's fused expert tensors under HF's names: gate_up_proj [E, 2I, H] and down_proj [E, H, I]
    ([E, H, 2I] and [E, I, H] when `spec.transposed`), plus gate_up_proj_bias / down_proj_bias; up_proj [E, I, H]
    in place of gate_up_proj for experts without a gate (spec.tensor_names)."""

    # (experts, tokens, rows) -> [N, H]: the fused path, set by automoe.kernels.apply_kernels
    fused_forward: Callable[..., torch.Tensor] | None = None
    # set by expert parallelism when no FSDP reduces these gradients (see distributed.parallelize)
    grad_scale: float | None = None

    def __init__(self, spec: ExpertsSpec, act_fn: nn.Module, backend: str) -> None:
        nn.Module.__init__(self)
        self.spec = spec
        self.act_fn = act_fn
        self.backend = backend

    @property
    def is_transposed(self) -> bool:
        """The layout flag transformers' use_experts_implementation declares; peft reads it to orient LoRA."""
        return self.spec.transposed

    def local_tensor(self, name: str) -> torch.Tensor | None:
        """This rank's experts of tensor `name` as a plain tensor (the local shard of an EP DTensor), None where
        the experts have no such tensor."""
        tensor = self._parameters.get(name)
        if tensor is None:
            return None
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        return tensor if self.grad_scale is None else _ScaleGrad.apply(tensor, self.grad_scale)

    def forward(self, tokens: torch.Tensor, rows: ExpertRows, adapters: dict[str, nn.Module] | None = None
                ) -> torch.Tensor:
        """`adapters`: peft's ParamWrappers around this module by the tensor each adapts (moe.lora), whose LoRA
        is computed on the routed rows; the MoE block passes them."""
        lora = self._lora_factors(adapters) if adapters else (None, None)
        if self.fused_forward is not None:
            return self.fused_forward(self, tokens, rows, lora=lora)
        first, down, first_bias, down_bias = self.spec.tensor_names
        w1, w2 = weight_in_out(self.local_tensor(first), self.spec), weight_in_out(self.local_tensor(down), self.spec)
        b1, b2 = self.local_tensor(first_bias), self.local_tensor(down_bias)
        xs = tokens[rows.token_of_row].to(w1.dtype)
        if self.backend == "grouped_mm":
            out = self._grouped(xs, rows, w1, w2, b1, b2, lora)
        else:
            out = self._per_expert(xs, rows, w1, w2, b1, b2, lora)
        weighted = out * rows.weights.unsqueeze(-1)  # fp32 router weights keep the sum in fp32, as HF does
        summed = weighted.new_zeros(tokens.shape[0], weighted.shape[-1])
        return summed.index_add(0, rows.token_of_row, weighted)

    def _lora_factors(self, adapters: dict[str, nn.Module]) -> tuple:
        from .lora import adapter_factors, local_tensor

        first = local_tensor(self._parameters[self.spec.tensor_names[0]])
        return adapter_factors(adapters, self.spec, first.dtype, first.shape[0])

    def _grouped(self, xs, rows, w1, w2, b1, b2, lora) -> torch.Tensor:
        (a1, f1), (a2, f2) = (pair or (None, None) for pair in lora)
        if xs.shape[0] == 0:  # grouped_mm's backward fails on zero rows; the weights still get (zero) gradients
            tensors = (w1, w2, b1, b2, a1, f1, a2, f2)
            return xs.new_zeros(0, w2.shape[-1]) + sum(t.sum() * 0 for t in tensors if t is not None)
        from .lora import project

        row_expert = rows.row_expert() if self.spec.has_bias else None
        hidden, _ = project(xs, w1, a1, f1, rows.offsets)
        if b1 is not None:
            hidden = hidden + b1[row_expert]
        out, _ = project(gated_activation(hidden, self.spec, self.act_fn), w2, a2, f2, rows.offsets)
        return out if b2 is None else out + b2[row_expert]

    def _per_expert(self, xs, rows, w1, w2, b1, b2, lora) -> torch.Tensor:
        (a1, f1), (a2, f2) = (pair or (None, None) for pair in lora)
        pieces, start = [xs.new_zeros(0, w2.shape[-1])], 0
        for e, end in enumerate(rows.offsets.tolist()):
            hidden = xs[start:end] @ w1[e]
            if a1 is not None:
                hidden = hidden + (xs[start:end] @ a1[e]) @ f1[e]
            if b1 is not None:
                hidden = hidden + b1[e]
            act = gated_activation(hidden, self.spec, self.act_fn)
            hidden = act @ w2[e]
            if a2 is not None:
                hidden = hidden + (act @ a2[e]) @ f2[e]
            pieces.append(hidden if b2 is None else hidden + b2[e])
            start = end
        return torch.cat(pieces)
