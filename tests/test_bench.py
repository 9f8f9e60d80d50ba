"""The bench harness on CPU with the tiny workload: both columns run in their own processes, same tokens and
weights (so their first losses agree), a table with ratios, JSON, PNG, and a sweep that stops at the first
sequence that does not fit."""

from __future__ import annotations

import json

import pytest
import torch

from automoe.bench import cli, measure, report, worker
from automoe.bench.columns import ColumnSpec
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
    for key in ("automoe-automoe", "automoe-automoe-in-backward"):
        first = cols[key]["runs"][0]["losses"][0], cols["v5"]["runs"][0]["losses"][0]
        assert first[0] == pytest.approx(first[1], rel=2e-2), "same weights and tokens give the same first loss"
    assert "AdamW in backward" in cols["automoe-automoe-in-backward"]["label"]
    assert result["columns"][0]["label"] == "automoe (own router)"


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
