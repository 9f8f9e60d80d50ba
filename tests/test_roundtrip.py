"""Checkpoints move both ways between automoe and plain transformers with bit-identical tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import make_config
from transformers import AutoModelForCausalLM

from automoe import AutoMoEForCausalLM

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss", "glm4_moe"]


def saved_tensors(path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_automoe_to_hf(family, tmp_path):
    hf = AutoModelForCausalLM.from_config(make_config(family))
    hf.save_pretrained(tmp_path / "hf")
    ours = AutoMoEForCausalLM.from_pretrained(tmp_path / "hf")
    assert_same_state(ours, hf)
    ours.save_pretrained(tmp_path / "ours")
    on_disk_hf, on_disk_ours = saved_tensors(tmp_path / "hf"), saved_tensors(tmp_path / "ours")
    assert set(on_disk_ours) == set(on_disk_hf), "same per-expert key set on disk"
    if family != "gpt_oss":  # gpt-oss checkpoints keep fused experts on disk; the others are per expert
        assert any(".experts.0." in k for k in on_disk_ours)
    for key, value in on_disk_hf.items():
        assert torch.equal(on_disk_ours[key], value), key
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert_same_state(back, hf)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_automoe_trained_to_hf(family, tmp_path):
    """A checkpoint written by automoe after training steps is what plain transformers loads."""
    ours = AutoMoEForCausalLM.from_config(make_config(family))
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    for _ in range(2):
        ours(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ours.save_pretrained(tmp_path / "ours")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", experts_implementation="eager")
    assert_same_state(hf, ours)
    again = AutoMoEForCausalLM.from_pretrained(tmp_path / "ours")
    assert_same_state(again, ours)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == family


def test_bf16_dtypes_are_kept(tmp_path):
    hf = AutoModelForCausalLM.from_config(make_config("qwen3_moe"), dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = AutoMoEForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert_same_state(ours, hf)


def test_hf_loading_keywords_pass_through(tmp_path):
    AutoModelForCausalLM.from_config(make_config("qwen3_moe")).save_pretrained(tmp_path)
    ours = AutoMoEForCausalLM.from_pretrained(
        tmp_path, device_map="cpu", attn_implementation="eager", dtype=torch.bfloat16
    )
    assert ours.config._attn_implementation == "eager"
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, ours.config.vocab_size, (1, 8))
    assert torch.isfinite(ours(input_ids=ids, labels=ids).loss)
