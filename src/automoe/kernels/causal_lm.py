"""The family's own CausalLM forward, with the training loss taken from hidden states (cross_entropy.py).

Instance-level: `model.forward` is wrapped on this one model, so plain transformers is unchanged for every
other model. The wrapper runs the family's own forward with `logits_to_keep` set to an empty index (no
logits are made) and reads the final hidden states off the decoder's output; the router aux loss HF
returns is added exactly as HF adds it. Without labels, outside training or without grad, the original
forward runs untouched.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from .cross_entropy import causal_lm_loss


def can_fuse_loss(model: nn.Module) -> bool:
    """The wrapper needs logits_to_keep, a bias-free linear lm_head and no logit soft-capping."""
    params = inspect.signature(type(model).forward).parameters
    head = getattr(model, "lm_head", None)
    config = model.config
    return (
        "logits_to_keep" in params
        and "labels" in params
        and isinstance(head, nn.Linear)
        and head.bias is None
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) is None
        and hasattr(model, "get_decoder")
    )


def fused_loss_forward(self, *args, **kwargs):
    labels = kwargs.pop("labels", None)
    original = type(self).forward
    plain = (
        labels is None
        or not self.training
        or not torch.is_grad_enabled()
        or len(args) > 1
        or kwargs.get("return_dict") is False
        or kwargs.get("logits_to_keep", 0) not in (0, None)
    )
    if plain:
        return original(self, *args, labels=labels, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    captured = {}

    def grab(module, inputs, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = self.get_decoder().register_forward_hook(grab)
    try:
        empty = torch.empty(0, dtype=torch.long, device=self.lm_head.weight.device)
        out = original(self, *args, labels=None, logits_to_keep=empty, **kwargs)
    finally:
        handle.remove()
    loss = causal_lm_loss(
        captured["hidden"], self.lm_head.weight, labels, self.automoe_kernels, num_items, shift_labels
    )
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        loss = loss + self.router_aux_loss_coef * aux.to(loss.device)
    fields = {key: value for key, value in out.items() if key not in ("loss", "logits")}
    return type(out)(loss=loss, **fields)


def patch_causal_lm(model: nn.Module, mode: str) -> bool:
    if not can_fuse_loss(model):
        return False
    aux_returned = "output_router_logits" in inspect.signature(type(model).forward).parameters
    if aux_returned and not hasattr(model, "router_aux_loss_coef"):
        return False
    model.automoe_kernels = mode
    model.forward = types.MethodType(fused_loss_forward, model)
    return True
