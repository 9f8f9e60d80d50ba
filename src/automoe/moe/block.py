"""The one MoE block every family runs: route -> dispatcher (dispatch -> experts -> combine) + shared experts."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .dispatch import LocalDispatcher
from .lora import split_param_wrappers
from .spec import BlockSpec


class MoEBlock(nn.Module):
    """Keeps the HF block's child names (spec.router_attr, spec.experts_attr, spec.shared_attr,
    spec.shared_gate_attr, the latent projections, the post norm and any parameter-free child, e.g. HF's
    nn.Identity stand-ins) and its own tensors (spec.router_tensors) so every parameter keeps its HF key.
    `dispatcher` is a plain attribute that expert parallelism swaps for its all-to-all version; the experts module
    is the same under every dispatcher."""

    def __init__(
        self,
        spec: BlockSpec,
        router: nn.Module,
        experts: nn.Module,
        shared: nn.Module | None = None,
        shared_gate: nn.Module | None = None,
        others: dict[str, nn.Module] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.spec = spec
        self.add_module(spec.router_attr, router)
        self.add_module(spec.experts_attr, experts)
        if spec.shared_attr:
            self.add_module(spec.shared_attr, shared)
        if spec.shared_gate_attr:
            self.add_module(spec.shared_gate_attr, shared_gate)
        for name, module in (others or {}).items():
            self.add_module(name, module)
        self.dispatcher = LocalDispatcher(spec.experts.num_experts)

    def _shared_experts(self, x: torch.Tensor) -> torch.Tensor:
        shared = getattr(self, self.spec.shared_attr)(x)
        if self.spec.shared_gate_attr:
            shared = torch.sigmoid(getattr(self, self.spec.shared_gate_attr)(x)) * shared
        return shared

    def forward(
        self, hidden_states: torch.Tensor, **inputs: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`inputs`: the keywords the HF block's forward takes after the hidden states (spec.block_inputs)."""
        unknown = set(inputs) - set(self.spec.block_inputs)
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword arguments {sorted(unknown)}")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.training and self.spec.jitter_noise > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.spec.jitter_noise, 1.0 + self.spec.jitter_noise)
            x = x * noise
        router = getattr(self, self.spec.router_attr)
        if self.spec.router is None:  # HF's own router, called as its block calls it
            routed = x.view(shape) if self.spec.router_batched else x
            args = (inputs.get(n) if n in self.spec.block_inputs else getattr(self, n) for n in self.spec.router_args)
            _, topk_weights, topk_ids = router(routed, *args)
        else:
            _, topk_weights, topk_ids = router(x)
        side = (lambda: self._shared_experts(x)) if self.spec.shared_attr else None
        tokens = getattr(self, self.spec.latent_in_attr)(x) if self.spec.latent_in_attr else x
        experts, adapters = split_param_wrappers(getattr(self, self.spec.experts_attr))
        if adapters:  # peft's LoRA on the expert tensors: computed inside the experts, on the routed rows
            experts = functools.partial(experts, adapters=adapters)
        out, shared = self.dispatcher(tokens, topk_ids, topk_weights, experts, side)
        out = out.to(x.dtype)
        if self.spec.latent_out_attr:
            out = getattr(self, self.spec.latent_out_attr)(out)
        if self.spec.routed_output_scale != 1.0:
            out = out * self.spec.routed_output_scale
        if shared is not None:
            out = out + shared if self.spec.shared_combine == "sum" else (out + shared) / 2
        if self.spec.post_norm_attr:
            out = getattr(self, self.spec.post_norm_attr)(out)
        out = out.view(shape)
        return (out, topk_weights) if self.spec.returns_router_scores else out
