"""Slice reads from safetensors and the per-expert key plan, against what transformers itself loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_configs import make_config
from transformers import AutoModelForCausalLM

from automoe.checkpoint.load import load_sharded_checkpoint
from automoe.checkpoint.mapping import plan_sources
from automoe.checkpoint.safetensors_io import SafetensorsFile


def test_row_reads_are_exact_and_counted(tmp_path):
    tensors = {"a": torch.randn(10, 3, 4), "b": torch.arange(7, dtype=torch.int64), "c": torch.tensor(2.5),
               "d": torch.randn(6, 5).to(torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    reader = SafetensorsFile(str(tmp_path))
    assert torch.equal(reader.read("a", (3, 7)), tensors["a"][3:7])
    assert reader.bytes_read == 4 * 12 * 4
    assert torch.equal(reader.read("b", (5, 7)), tensors["b"][5:])
    assert torch.equal(reader.read("c"), tensors["c"])
    assert torch.equal(reader.read("d"), tensors["d"])
    assert reader.read("a", (10, 10)).shape == (0, 3, 4)
    assert reader.bytes_read == 4 * 12 * 4 + 2 * 8 + 4 + 30 * 2


def test_sharded_checkpoint_with_index(tmp_path):
    model = AutoModelForCausalLM.from_config(make_config("qwen3_moe"))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    reader = SafetensorsFile(str(tmp_path))
    everything = {}
    for path in tmp_path.glob("*.safetensors"):
        everything.update(load_file(path))
    assert set(reader.entries) == set(everything)
    for key, tensor in everything.items():
        assert torch.equal(reader.read(key), tensor)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SafetensorsFile(str(tmp_path))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_plan_rebuilds_what_transformers_loads(tmp_path, family):
    """Filling the fused tensors from the plan, expert by expert, gives transformers' own loaded tensors."""
    source = AutoModelForCausalLM.from_config(make_config(family))
    source.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reader = SafetensorsFile(str(tmp_path))
    state = loaded.state_dict()
    plan, unexpected = plan_sources(loaded, list(reader.entries), set(state))
    assert unexpected == []
    assert set(plan) == set(state)
    assert any(s.expert is not None for sources in plan.values() for s in sources)
    for name, sources in plan.items():
        rebuilt = torch.empty_like(state[name])
        for s in sources:
            if s.expert is None:
                rebuilt.copy_(reader.read(s.key))
            else:
                rows = rebuilt.shape[1] // s.parts
                rebuilt[s.expert, s.part * rows : (s.part + 1) * rows] = reader.read(s.key)
        assert torch.equal(rebuilt, state[name]), name


def test_plan_reports_unexpected_keys(tmp_path):
    model = AutoModelForCausalLM.from_config(make_config("qwen3_moe"))
    keys = ["model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.9.mtp.weight"]
    plan, unexpected = plan_sources(model, keys, set(model.state_dict()))
    assert unexpected == ["model.layers.9.mtp.weight"]
    assert plan["model.layers.0.mlp.experts.gate_up_proj"][0].expert == 0


def test_loader_on_whole_tensors_equals_transformers(tmp_path):
    """The sharded loader given unsharded tensors (every rank owning everything) loads what transformers does;
    a checkpoint missing a tensor is an error that names it."""
    source = AutoModelForCausalLM.from_config(make_config("qwen3_moe"))
    source.save_pretrained(tmp_path / "full")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    target = AutoModelForCausalLM.from_config(make_config("qwen3_moe"))
    reader = load_sharded_checkpoint(target, str(tmp_path / "full"), rows_of=None)
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    tensors = load_file(tmp_path / "full" / "model.safetensors")
    assert reader.bytes_read == sum(t.numel() * t.element_size() for t in tensors.values())
    tensors.pop("model.layers.1.mlp.experts.5.up_proj.weight")
    (tmp_path / "broken").mkdir()
    save_file(tensors, tmp_path / "broken" / "model.safetensors")
    with pytest.raises(ValueError, match=r"no tensors for experts \[5\] of model.layers.1.mlp.experts.gate_up_proj"):
        load_sharded_checkpoint(target, str(tmp_path / "broken"), rows_of=None)
