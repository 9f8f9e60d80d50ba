"""The bench harness on CPU with the tiny workload: both columns run in their own processes, same tokens and
weights (so their first losses agree), a table with ratios, JSON, PNG, and a sweep that stops at the first
sequence that does not fit."""

from __future__ import annotations

import json

import pytest
import torch

from automoe.bench import cli, measure, report, worker
from automoe.bench.columns import ColumnSpec, build_model
from automoe.bench.workload import QWEN3_30B_A3B, flops_per_token, make_config


def test_bench_runs_both_columns_in_subprocesses(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--workload", "tiny", "--layers", "1", "--seq", "32", "--steps", "1", "--warmup", "1",
            "--max-seq", "64", "--out", str(out), "--columns", "automoe,v5", "--device", "cpu",
            "--optimizer", "automoe,automoe-in-backward"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "automoe (own router) / Transformers v5" in printed and "step TPS by seq" in printed
    result = json.loads((out / "bench-tiny-seq32.json").read_text())
    assert (out / "bench-tiny-seq32.png").stat().st_size > 0
    cols = {c["key"]: c for c in result["columns"]}
    assert set(cols) == {"automoe-automoe", "automoe-automoe-in-backward", "v5"}
    for col in cols.values():
        assert [r["seq"] for r in col["runs"]] == [32, 64]
        assert all(r["step_tps"] > 0 and r["step_ms"] >= r["fwd_loss_ms"] for r in col["runs"])
    # at random init every model's loss is near ln(vocab); models from seeds 0, 1, 2 differ by 1e-3..7e-3 relative,
    # the columns from one seed by 1e-5: each column's first loss is that of the v5 model built here from seed 0
    expected = _first_loss(seed=0)
    assert abs(_first_loss(seed=1) - expected) > 1e-3 * expected, "the check can tell other weights apart"
    for col in cols.values():
        assert col["runs"][0]["losses"][0] == pytest.approx(expected, rel=1e-4), col["key"]
    assert "AdamW in backward" in cols["automoe-automoe-in-backward"]["label"]
    assert result["columns"][0]["label"] == "automoe (own router)"


def _first_loss(seed: int) -> float:
    """The loss of the tiny 1-layer v5 model built from `seed` on the bench's seq-32 tokens of seed 0."""
    config = make_config("tiny", 1)
    torch.manual_seed(seed)
    model = build_model(ColumnSpec("v5"), config, torch.device("cpu"))
    tokens = measure.tokens_for(config.vocab_size, 1, 32, 0, torch.device("cpu"))
    with torch.no_grad():
        return model(input_ids=tokens, labels=tokens).loss.item()


def test_sweep_stops_at_the_first_sequence_that_runs_out_of_memory(monkeypatch):
    real = measure.measure

    def measure_or_oom(model, optimizer, tokens, warmup, steps):
        if tokens.shape[1] > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, optimizer, tokens, warmup, steps)

    monkeypatch.setattr(worker, "measure", measure_or_oom)
    args = cli.parse(["--workload", "tiny", "--layers", "1", "--seq", "32", "--steps", "1", "--warmup", "0",
                      "--max-seq", "512", "--device", "cpu", "--router", "balanced"])
    result = cli.run_in_process(ColumnSpec("automoe", router="balanced", optimizer="automoe"), args, dense=False)
    assert [(r["seq"], bool(r.get("oom"))) for r in result["runs"]] == [(32, False), (64, False), (128, True)]
    assert result["label"] == "automoe (balanced router)"


def test_gpu_state_is_reported_per_column_where_it_was_sampled():
    state = measure.GpuState(torch.device("cpu"))
    state.sample()
    assert state.summary() == {}, "no GPU, no NVML samples"
    state.samples = [(1500, 690.0, True), (1700, 600.0, False), (1600, 700.0, True)]
    run = {"seq": 32, "batch": 1, **state.summary()}
    assert (run["sm_clock_mhz"], run["power_w"], run["power_capped_steps"]) == (1600, 690.0, "2/3")
    result = {"columns": [{"label": "automoe", "runs": [run]}, {"label": "v5", "runs": [{"seq": 32, "oom": True}]}]}
    assert report.gpu_state_lines(result) == [
        "GPU state read after each timed step (median): automoe 1600 MHz 690 W (power-capped 2/3)"]


def test_a_failing_column_is_reported_with_its_last_line_and_its_output(capfd):
    args = cli.parse(["--workload", "tiny", "--layers", "1", "--seq", "16", "--steps", "1", "--warmup", "0",
                      "--device", "cpu"])
    args.workload = "llama"  # past the parser: the column's own process fails on it
    result = cli.run_subprocess(ColumnSpec("automoe", optimizer="automoe"), args, dense=False)
    assert result["runs"] == [] and result["error"].startswith("exit 1: ")
    assert "unknown workload 'llama'" in result["error"], result["error"]
    assert "Traceback" in capfd.readouterr().err, "the column's output reaches the terminal"


def test_flops_per_token_counts_active_weights_and_causal_attention():
    config = make_config("qwen3-30b-a3b-l8")
    s = QWEN3_30B_A3B
    h, i, e, k, layers, vocab = (s["hidden_size"], s["moe_intermediate_size"], s["num_experts"],
                                 s["num_experts_per_tok"], 8, s["vocab_size"])
    heads, kv_heads, head_dim = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    attention_proj = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
    per_layer = attention_proj + k * 3 * h * i + h * e
    want = 6 * (layers * per_layer + h * vocab) + 6 * layers * heads * head_dim * 4096
    assert flops_per_token(config, 4096) == pytest.approx(want)


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        cli.parse(["--columns", "automoe,deepspeed"])
    with pytest.raises(ValueError, match="unknown workload"):
        make_config("llama")


def test_bench_under_torchrun_two_gloo_ranks(tmp_path):
    """Under torchrun every rank runs the columns in-process with FSDP2; rank 0 writes one JSON."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "automoe.bench",
           "--workload", "tiny", "--layers", "1", "--seq", "32", "--steps", "1", "--warmup", "1", "--device", "cpu",
           "--columns", "automoe,v5", "--out", str(tmp_path), "--no-plot"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench-tiny-seq32.json").read_text())
    assert result["world_size"] == 2
    assert [c["column"] for c in result["columns"]] == ["automoe", "v5"]
    assert all(c["runs"][0]["step_tps"] > 0 for c in result["columns"])


FAKE_NEMO = {
    "nemo_automodel/__init__.py": (
        "class NeMoAutoModelForCausalLM:\n"
        "    @classmethod\n"
        "    def from_config(cls, config, force_hf=False, **kwargs):\n"
        "        path = 'hf' if force_hf else 'custom'\n"
        "        raise RuntimeError(f'fake {path} build failed for {config.architectures}')\n"),
    "nemo_automodel/components/__init__.py": "",
    "nemo_automodel/components/models/__init__.py": "",
    "nemo_automodel/components/models/common/__init__.py": "",
    "nemo_automodel/components/models/common/utils.py": (
        "from dataclasses import dataclass\n\n\n@dataclass\nclass BackendConfig:\n"
        "    fake_balanced_gate: bool = False\n"),
}


def test_nemo_column_not_importable_is_named_and_the_other_columns_run(tmp_path, capsys):
    argv = ["--workload", "tiny", "--layers", "1", "--seq", "16", "--steps", "1", "--warmup", "0", "--device", "cpu",
            "--columns", "v5,nemo", "--nemo-path", str(tmp_path / "empty"), "--out", str(tmp_path), "--no-plot"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"not run: nemo (nemo_automodel not importable from --nemo-path {tmp_path / 'empty'})" in printed
    result = json.loads((tmp_path / "bench-tiny-seq16.json").read_text())
    assert [c["column"] for c in result["columns"]] == ["v5"] and result["columns"][0]["runs"][0]["step_tps"] > 0
    assert result["skipped_columns"] == ["nemo"] and "not importable" in result["skip_reasons"]["nemo"]


def test_nemo_column_tries_its_hf_path_after_its_custom_path_and_keeps_both_errors(tmp_path, capsys):
    """A NeMo whose every build fails (a stand-in package on --nemo-path): the bench still finishes, the column's
    process saw the package (so --nemo-path reached it alone), and both paths' errors are in the JSON and the table."""
    for name, text in FAKE_NEMO.items():
        (tmp_path / "site" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "site" / name).write_text(text)
    argv = ["--workload", "tiny", "--layers", "1", "--seq", "16", "--steps", "1", "--warmup", "0", "--device", "cpu",
            "--columns", "nemo", "--nemo-path", str(tmp_path / "site"), "--out", str(tmp_path), "--no-plot"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    column = json.loads((tmp_path / "bench-tiny-seq16.json").read_text())["columns"][0]
    errors = column["nemo"]["errors"]
    assert list(errors) == ["custom", "hf"], errors
    assert "fake custom build failed for ['Qwen3MoeForCausalLM']" in errors["custom"], "the architecture is named"
    assert "fake hf build failed" in errors["hf"]
    assert column["runs"] == [] and column["error"].startswith("custom path: RuntimeError: fake custom")
    assert "NeMo AutoModel custom path failed: RuntimeError" in printed and "NeMo AutoModel hf path failed" in printed


def test_nemo_recipe_loss_matches_the_hf_loss_and_its_gradients():
    """NeMo's recipe loss (shifted labels, its MaskedCrossEntropy summed over label tokens / their count) on a model
    that returns logits equals the HF model's own loss with labels = tokens, gradients included."""
    pytest.importorskip("nemo_automodel.components.loss.masked_ce")
    from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy
    from transformers import AutoModelForCausalLM

    from automoe.bench.nemo_column import RecipeLossModel

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("tiny", 1)).float()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    want = model(input_ids=tokens, labels=tokens).loss
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = RecipeLossModel(model, MaskedCrossEntropy())(input_ids=tokens, labels=tokens).loss
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match="labels = input_ids"):
        RecipeLossModel(model, MaskedCrossEntropy())(input_ids=tokens, labels=tokens.clone())


def test_nemo_custom_model_gets_the_other_columns_weights_and_their_loss(monkeypatch):
    """NeMo's own Qwen3-MoE model, given the HF init from the seed through its state-dict adapter, trains on the
    same loss as the HF model from that seed (same weights, same routing), by the recipe loss."""
    pytest.importorskip("nemo_automodel.components.models.qwen3_moe.model")
    from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy
    from nemo_automodel.components.models.common.utils import BackendConfig
    from nemo_automodel.components.models.qwen3_moe.model import Qwen3MoeForCausalLM
    from transformers import AutoModelForCausalLM

    from automoe.bench.nemo_column import RecipeLossModel, load_reference_weights

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # its constructor names cuda:N; nothing lands there
    config = make_config("tiny", 2)
    model = Qwen3MoeForCausalLM(config, backend=BackendConfig(experts="torch"))
    model.initialize_weights(buffer_device=torch.device("cpu"), dtype=torch.float32)
    load_reference_weights(model, config, seed=3, custom=True)
    torch.manual_seed(3)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    want = reference(input_ids=tokens, labels=tokens).loss
    got = RecipeLossModel(model, MaskedCrossEntropy())(input_ids=tokens, labels=tokens).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
