"""automoe.describe(model): per kind of module, the path that runs and why, read off the built model."""

from __future__ import annotations

import logging
import sys

from experts_sweep import tiny_config
from tiny_configs import make_config

import automoe
from automoe import AutoMoEForCausalLM
from automoe.describe import Row, rows


def paths(model) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row, _ in rows(model):
        out.setdefault(row.kind, []).append(f"{row.path} ({row.why})")
    return out


def test_qwen3_moe_on_cpu_runs_the_references_and_says_why():
    model = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), automoe_options={"fused_loss": True})
    got = paths(model)
    assert got["moe block"] == [got["moe block"][0]] and "automoe routed experts (grouped_mm)" in got["moe block"][0]
    assert "softmax top-k: torch reference" in got["router"][0]
    assert all("Triton" in why or "triton" in why for why in got["rmsnorm"] + got["router"]), got
    assert got["loss"][0].startswith("chunked linear + cross-entropy")
    assert got["attention"][0].startswith("SDPA, cuDNN first")
    text = automoe.describe(model)
    assert text.startswith("automoe: Qwen3MoeForCausalLM (qwen3_moe, torch.float32 on cpu)")
    assert "moe block x2" in text and "rmsnorm x9" in text  # 2 layers x (2 norms + q/k norms) + final norm


def test_sigmoid_router_and_forced_paths_are_named():
    model = AutoMoEForCausalLM.from_config(make_config("deepseek_v3"), automoe_options={"kernels": "torch"})
    got = paths(model)
    assert got["router"] == ["sigmoid top-k: torch (the sigmoid rule has no fused kernel)"]
    assert got["rmsnorm"][0] == "torch reference (kernels='torch')"
    assert got["loss"][0].startswith("plain HF logits")


def test_per_expert_and_unrecognised_blocks_are_named():
    model = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), automoe_options={"experts_backend": "per_expert"})
    assert paths(model)["moe block"] == ["automoe experts (per_expert), composed autograd "
                                         "(experts_backend='per_expert')"]
    zaya = AutoMoEForCausalLM.from_config(tiny_config("zaya"))
    block = paths(zaya)["moe block"]
    assert block == ["plain HF ZayaSparseMoeBlock (ZayaSparseMoeBlock has a part automoe does not know: gate "
                     "(ZayaRouter))"], block


def test_parts_kept_as_hf_code_are_named(monkeypatch):
    # PhiMoE's sparsemixer router and HY-V4's clamped gate have no automoe rule: HF's code runs there, on torch;
    # experts whose activation the kernels cannot name take the composed path even where Triton runs
    got = paths(AutoMoEForCausalLM.from_config(make_config("phimoe")))
    assert got["router"] == ["plain HF PhimoeTopKRouter, torch (no automoe router rule reproduces it)"], got
    assert "automoe routed experts (grouped_mm)" in got["moe block"][0]
    model = AutoMoEForCausalLM.from_config(tiny_config("hy_v4"))
    module = sys.modules["automoe.describe"]  # `automoe.describe` is the function
    monkeypatch.setattr(module, "kernel_path", lambda mode, tensor: Row("", "fused Triton"))  # as on CUDA
    assert paths(model)["moe block"] == [
        "automoe experts (grouped_mm), composed autograd (no Triton kernel for the experts' own gate activation "
        "(HF's _apply_gate))"]


def test_one_summary_line_is_logged_at_load(caplog):
    with caplog.at_level(logging.INFO, logger="automoe"):
        AutoMoEForCausalLM.from_config(make_config("qwen3_moe"))
    lines = [r.getMessage() for r in caplog.records if r.name == "automoe"]
    assert len(lines) == 1 and lines[0].startswith("automoe: qwen3_moe: moe block x2 automoe routed experts")
    assert "\n" not in lines[0]


def test_swapped_modules_carry_their_own_class_names():
    """A kernel-swapped module's class says so (AutoMoE<HF class>), in repr and profiles; isinstance still holds."""
    import transformers.models.qwen3_moe.modeling_qwen3_moe as hf

    model = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"))
    norm, attention = model.model.norm, model.model.layers[0].self_attn
    assert type(norm).__name__ == "AutoMoEQwen3MoeRMSNorm" and isinstance(norm, hf.Qwen3MoeRMSNorm)
    assert type(attention).__name__ == "AutoMoEQwen3MoeAttention" and isinstance(attention, hf.Qwen3MoeAttention)
    assert "(norm): AutoMoEQwen3MoeRMSNorm" in repr(model)
    block = model.model.layers[0].mlp
    assert type(block).__name__ == "AutoMoEQwen3MoeSparseMoeBlock" and isinstance(block, hf.Qwen3MoeSparseMoeBlock)
    assert type(block.experts).__name__ == "AutoMoEQwen3MoeExperts" and isinstance(block.experts, hf.Qwen3MoeExperts)


def test_describe_lists_every_class_automoe_derived():
    """The classes line comes from automoe.derived, the one registry of changed modules: every kind, with counts."""
    model = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"))
    assert automoe.describe(model).splitlines()[-1] == (
        "  classes: AutoMoEQwen3MoeAttention x2 (rope), AutoMoEQwen3MoeRMSNorm x9 (rmsnorm), "
        "AutoMoEQwen3MoeSparseMoeBlock x2 (moe block), AutoMoEQwen3MoeExperts x2 (experts), "
        "AutoMoEQwen3MoeTopKRouter x2 (router)")


def test_non_gated_experts_are_described():
    # NemotronH's experts hold up_proj/down_proj, no gate_up_proj: describe (also run by the load-time summary) used
    # to read gate_up_proj and failed every NemotronH load
    model = AutoMoEForCausalLM.from_config(make_config("nemotron_h"))
    got = paths(model)
    assert "automoe routed experts (grouped_mm)" in got["moe block"][0], got
    assert "moe block x" in automoe.describe(model)
