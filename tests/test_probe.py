"""The numerical check of a family matched by structure alone runs on every load path: on a model whose
parameters are on the meta device (how every distributed load builds) it runs on a CPU twin of the block."""

from __future__ import annotations

import warnings

import pytest
import torch
from experts_sweep import tiny_config
from tiny_configs import make_config
from transformers import AutoModelForCausalLM

from automoe import AutoMoEForCausalLM
from automoe.distributed.load import _parameters_on_meta
from automoe.moe.block import MoEBlock
from automoe.optimize import AutoMoEWarning, optimize_model
from automoe.options import AutoMoEOptions


def _meta_model(family: str):
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(make_config(family))
    assert all(p.device.type == "meta" for p in model.parameters())
    return model


def _doubled(block_cls: type) -> type:
    """The same block structure, computing twice what HF's computes: structure alone cannot tell."""
    def forward(self, x):
        return 2 * block_cls.forward(self, x)

    return type(f"Doubled{block_cls.__name__}", (block_cls,), {"forward": forward})


def test_meta_model_of_a_structurally_matched_family_is_checked():
    model = _meta_model("flex_olmo")
    for layer in model.model.layers:
        layer.mlp.__class__ = _doubled(type(layer.mlp))
    with pytest.warns(AutoMoEWarning, match="computes something else than its structure suggests"):
        optimize_model(model, AutoMoEOptions())
    assert not any(isinstance(m, MoEBlock) for m in model.modules())


def test_meta_model_that_matches_is_accelerated_without_warning():
    model = _meta_model("flex_olmo")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoMoEWarning)
        optimize_model(model, AutoMoEOptions())
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == model.config.num_hidden_layers
    assert all(p.device.type == "meta" for p in model.parameters()), "the check leaves the model's tensors alone"
    assert torch.is_tensor(blocks[0].experts.gate_up_proj)


@pytest.mark.parametrize("model_type", ["minimax_m2", "deepseek_v4"])
def test_meta_model_keeping_hf_parts_is_checked_on_its_twin(model_type):
    """HF's own router (MiniMax-M2's with the block's correction bias; DeepSeek-V4's hash router, which takes the
    block's input_ids) and HF's own gate activation run in the twin's check too, and stay HF's modules on meta."""
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    with pytest.warns(AutoMoEWarning, match="parts that run transformers' own code"):
        optimize_model(model, AutoMoEOptions())
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    assert blocks and all(b.spec.router is None for b in blocks)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_hf_gate_holds_no_expert_tensors():
    model = AutoMoEForCausalLM.from_config(tiny_config("hy_v4"))
    experts = next(m for m in model.modules() if isinstance(m, MoEBlock)).experts
    shell = experts.act_fn.hf_experts  # HY-V4's _apply_gate runs on a tensorless copy of its experts module
    assert experts.spec.activation == "hf_gate" and not list(shell.parameters()) and not list(shell.buffers())
    assert experts.gate_up_proj is not None and "act_fn" not in {n.split(".")[-1] for n, _ in model.named_parameters()}
