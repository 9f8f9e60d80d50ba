"""Checkpoints move both ways between automoe and plain transformers with bit-identical tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import make_config
from transformers import AutoModelForCausalLM

from automoe import AutoMoEForCausalLM
from automoe.derived import changes

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


def runtime_classes(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Module name -> (class name, kind of change, HF class) for every module whose class automoe derived."""
    return {change.module: (type(model.get_submodule(change.module)).__name__, change.kind, change.hf_class)
            for change in changes(model)}


def test_whole_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    """torch.save(model) of an automoe model (MoE blocks of run-time HF-compatible classes, kernel-swapped norms
    and attention): loaded in this process and in a fresh one (where automoe built nothing yet), it has the same
    modules and computes the same logits. Saved before any forward, as with plain transformers, whose
    output-capturing hooks (installed by the first forward) do not pickle."""
    torch.manual_seed(0)
    model = AutoMoEForCausalLM.from_config(make_config("qwen3_moe")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    built = runtime_classes(model)
    builders = {arg for entry in built.values() for arg in entry[1:]}
    assert {"rmsnorm", "rope", "moe block", "experts", "router", "Qwen3MoeSparseMoeBlock"} <= builders
    torch.save(model, tmp_path / "model.pt")
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        want = model(input_ids=ids).logits

    again = torch.load(tmp_path / "model.pt", weights_only=False)
    assert runtime_classes(again) == built
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, want)

    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_roundtrip import runtime_classes\n"
        f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
        f"torch.save(runtime_classes(m), {str(tmp_path / 'built.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    assert torch.load(tmp_path / "built.pt") == built
    assert torch.equal(torch.load(tmp_path / "logits.pt"), want)
