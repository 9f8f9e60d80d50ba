"""Bad input and unsupported models: clear errors and warnings that name the problem and the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from tiny_configs import make_config

from automoe import AutoMoEForCausalLM, AutoMoEOptions, AutoMoEWarning
from automoe.moe.block import MoEBlock
from automoe.optimize import optimize_model


def moe_blocks(model) -> int:
    return sum(isinstance(m, MoEBlock) for m in model.modules())


def test_unknown_experts_backend_is_named():
    with pytest.raises(ValueError, match="unknown experts_backend 'fast'.*grouped_mm, per_expert"):
        AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), automoe_options={"experts_backend": "fast"})


def test_unknown_option_key_is_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['expert_backend'\]"):
        AutoMoEOptions.coerce({"expert_backend": "grouped_mm"})


def test_wrong_option_type():
    with pytest.raises(TypeError, match="automoe_options must be"):
        AutoMoEOptions.coerce("grouped_mm")


def test_disabled_loads_plain_hf():
    model = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), automoe_options=False)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and moe_blocks(model) == 0


def test_unaligned_expert_rows_load_on_the_per_expert_path_with_one_warning():
    """An intermediate size of 6 (24-byte fp32 rows) is a shape transformers loads; automoe loads it too, on a
    correct path, and says so once."""
    config = make_config("qwen3_moe", moe_intermediate_size=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoMoEForCausalLM.from_config(config)
    said = [w for w in caught if issubclass(w.category, AutoMoEWarning)]
    assert len(said) == 1 and "6 x 4 bytes" in str(said[0].message) and "per_expert" in str(said[0].message)
    assert moe_blocks(model) == 2
    reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(3, config.vocab_size, (2, 12))
    got, want = model(input_ids=ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _qwen3_moe_with(change) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_config(make_config("qwen3_moe"))
    for layer in model.model.layers:
        change(layer.mlp)
    return model


def test_router_automoe_can_neither_reproduce_nor_run_warns_once_with_family_and_reason():
    def two_outputs(block):  # a router returning (logits, weights): neither a known rule nor HF's router contract
        cls = type(block.gate)
        block.gate.__class__ = type("TwoOutputRouter", (cls,), {"forward": lambda self, x: cls.forward(self, x)[:2]})

    message = (r"qwen3_moe: 2 MoE block\(s\) left as plain transformers.*router TwoOutputRouter does not return "
               r"\(logits, weights, ids\); nor does it run as HF's own module")
    with pytest.warns(AutoMoEWarning, match=message):
        model = optimize_model(_qwen3_moe_with(two_outputs), AutoMoEOptions())
    assert moe_blocks(model) == 0


def test_unrecognised_block_part_warns():
    def extra_part(block):
        block.extra = torch.nn.Linear(4, 4)

    with pytest.warns(AutoMoEWarning, match=r"qwen3_moe.*part automoe does not know: extra \(Linear\)"):
        model = optimize_model(_qwen3_moe_with(extra_part), AutoMoEOptions())
    assert moe_blocks(model) == 0


def test_moe_without_fused_experts_warns():
    config = transformers.JetMoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        kv_channels=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
    )
    with pytest.warns(AutoMoEWarning, match="jetmoe: a mixture-of-experts model.*not accelerated"):
        model = AutoMoEForCausalLM.from_config(config)
    assert type(model).__name__ == "JetMoeForCausalLM"


def test_non_moe_model_loads_plain_without_warning():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=16
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoMoEWarning)
        model = AutoMoEForCausalLM.from_config(config)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_structural_match_that_computes_differently_is_not_accelerated(monkeypatch):
    """A family matched by structure alone is probed against its HF block; a mismatch keeps HF's block."""
    from transformers.models.flex_olmo import modeling_flex_olmo

    original = modeling_flex_olmo.FlexOlmoSparseMoeBlock.forward
    monkeypatch.setattr(modeling_flex_olmo.FlexOlmoSparseMoeBlock, "forward", lambda self, x: 2 * original(self, x))
    with pytest.warns(AutoMoEWarning, match="computes something else than its structure suggests"):
        model = AutoMoEForCausalLM.from_config(make_config("flex_olmo"))
    assert moe_blocks(model) == 0


def test_experts_implementation_kwarg_is_flagged():
    with pytest.warns(AutoMoEWarning, match="experts_implementation='eager' applies only to MoE blocks"):
        AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), experts_implementation="eager")


def test_n_group_not_dividing_experts_is_a_config_error():
    from automoe.moe.spec import RouterSpec

    with pytest.raises(ValueError, match="n_group=3 does not divide num_experts=8"):
        RouterSpec(num_experts=8, top_k=2, score_func="sigmoid", n_group=3)


def test_balanced_router_spreads_tokens_evenly():
    model = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), automoe_options={"router": "balanced"})
    block = next(m for m in model.modules() if isinstance(m, MoEBlock))
    _, weights, ids = block.gate(torch.randn(16, 32))
    assert torch.bincount(ids.flatten(), minlength=8).tolist() == [4] * 8
    assert torch.allclose(weights, torch.full_like(weights, 0.5))
