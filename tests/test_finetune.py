"""`automoe finetune` end to end: the embedded default learns and exports a checkpoint plain transformers
runs; a run killed during a checkpoint write resumes to the same losses; 2 gloo ranks with EP match 1 rank."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from automoe.train.config import load_recipe, parse_overrides
from automoe.train.runtime import Runtime
from automoe.train.state import complete_checkpoints, load_checkpoint
from automoe.train.trainer import run

# fast settings for the process-level tests: tiny batches, no generation, no export
QUICK = ["--train.batch_size", "4", "--data.validation", "null", "--eval.generate", "false", "--output.export",
         "false", "--output.plot", "false", "--train.progress", "false", "--schedule.warmup_steps", "2"]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def finetune(args: list[str], env: dict | None = None, wait: bool = True) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "automoe.cli", "finetune", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    return proc


def run_group(cmd: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run a launcher in its own process group; on a timeout the whole group (its workers too) is killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s:\n{out}") from None
    return proc.returncode, out


def test_embedded_default_learns_and_exports_a_plain_hf_checkpoint(tmp_path):
    recipe = load_recipe(overrides=[("output.dir", str(tmp_path / "run")), ("train.progress", False)])
    summary = run(recipe)
    assert summary["exact_match_before"] <= 0.05
    assert summary["exact_match_after"] >= 0.9
    curve = losses(tmp_path / "run")
    assert curve[recipe.train.max_steps] < 0.05 * curve[1]
    if importlib.util.find_spec("matplotlib"):
        assert Path(summary["plot"]).stat().st_size > 0

    # plain transformers, no automoe: load, generate greedily, get the reversed words
    final = Path(summary["export_dir"])
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert type(model).__module__.startswith("transformers.")
    words = ["qwerty", "moe", "kitchen", "abcdefg"]
    hits = 0
    for word in words:
        chat = [{"role": "user", "content": word}]
        prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        hits += tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == word[::-1]
    assert hits >= 3

    # the export is also a local checkpoint a recipe can start from (model.path, its own tokenizer)
    again = run(load_recipe(overrides=[("model.path", str(final)), ("model.config", None), ("model.tokenizer", "model"),
                                       ("train.max_steps", 3), ("eval.num_samples", 20), ("train.progress", False),
                                       ("output.dir", str(tmp_path / "again")), ("output.export", False)]))
    assert again["exact_match_before"] >= 0.9
    assert losses(tmp_path / "again")[1] < 0.1


def test_grad_accumulation_follows_the_same_curve(tmp_path):
    curves = []
    for accum in (1, 4):
        args = QUICK + ["--train.batch_size", "8", "--train.grad_accum", str(accum), "--train.max_steps", "4",
                        "--output.dir", str(tmp_path / str(accum))]
        run(load_recipe(overrides=parse_overrides(args)))
        curves.append(losses(tmp_path / str(accum)))
    for step in curves[0]:
        assert abs(curves[0][step] - curves[1][step]) <= 1e-5, step


def test_kill_during_checkpoint_write_then_resume_gives_the_same_losses(tmp_path):
    steps, every = 8, 2
    base = QUICK + ["--train.max_steps", str(steps), "--train.save_every", str(every)]
    finetune(base + ["--output.dir", str(tmp_path / "straight")])
    reference = losses(tmp_path / "straight")

    out = tmp_path / "killed"
    root = out / "checkpoints"
    proc = finetune(base + ["--output.dir", str(out)], env={"AUTOMOE_TEST_PAUSE": "save_6=60"}, wait=False)
    partial = root / ".step_00000006.tmp"
    deadline = time.time() + 240
    try:
        while not (partial / ".metadata").exists():  # tensors of step 6 written, checkpoint not yet committed
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the step-6 checkpoint write never started"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

    # the interrupted write left only a hidden temporary; every committed checkpoint loads
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000002", "step_00000004"]
    assert partial.exists()
    rt = Runtime(0, 1, 0, 1, torch.device("cpu"), None)
    recipe = load_recipe(overrides=[("train.batch_size", 4)])
    from automoe.train.model import build_model
    from automoe.train.tokenizer import build_char_tokenizer
    from automoe.train.trainer import make_optimizer

    for ckpt in complete_checkpoints(root):
        model = build_model(recipe.model, build_char_tokenizer(), rt, 0, 0.0, tmp_path / "unused")
        extra = load_checkpoint(ckpt, model, make_optimizer(recipe, model), rt)
        assert extra["step"] == int(ckpt.name.split("_")[1])

    finetune(base + ["--output.dir", str(out), "--resume"])
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed[step], reference[step])
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000006", "step_00000008"]  # the last step too


def test_resume_without_a_checkpoint_and_a_fresh_run_over_checkpoints_are_errors(tmp_path, capsys):
    from automoe.train.cli import main

    assert main(QUICK + ["--output.dir", str(tmp_path), "--resume"]) == 2
    assert "--resume: no complete checkpoint" in capsys.readouterr().err
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    assert main(QUICK + ["--output.dir", str(tmp_path)]) == 2
    assert "is not empty (it holds checkpoints); pass --resume" in capsys.readouterr().err


def test_two_gloo_ranks_with_ep2_follow_the_one_process_curve(tmp_path):
    pytest.importorskip("automoe.distributed")
    steps = 12
    common = ["--train.max_steps", str(steps), "--train.progress", "false", "--train.eval_every", "6",
              "--train.save_every", "6", "--eval.num_samples", "20", "--output.plot", "false"]
    one = finetune(common + ["--output.dir", str(tmp_path / "one")])
    one.stdout.close()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "automoe.cli", "finetune", *common, "--output.dir", str(tmp_path / "two"),
           "--distributed", "{ep_size: 2}"]
    rc, log = run_group(cmd)
    assert rc == 0, log
    first = losses(tmp_path / "two")

    records = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("one", "two")}
    assert len(records["one"]) == len(records["two"])
    for a, b in zip(records["one"], records["two"], strict=True):
        assert a["step"] == b["step"]
        for key in ("loss", "val_loss", "grad_norm", "exact_match"):
            assert (key in a) == (key in b)
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-4, (a["step"], key, a[key], b[key])
    # the sharded run's export is the same standard checkpoint
    m1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    assert m1.keys() == m2.keys()
    for key in m1:
        torch.testing.assert_close(m1[key], m2[key], atol=1e-4, rtol=1e-4)
    assert len(list((tmp_path / "two" / "checkpoints" / "step_00000006").glob("rank*.pt"))) == 2

    # resuming the sharded run from its step-6 checkpoint (DCP, each rank its shards) retraces steps 7-12
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step_00000012")  # the last step's, which would train nothing
    rc, log = run_group(cmd + ["--resume"])
    assert rc == 0, log
    assert "resumed from" in log
    again = losses(tmp_path / "two")
    assert sorted(again) == list(range(1, steps + 1))
    for step in range(7, steps + 1):
        assert abs(again[step] - first[step]) <= 1e-6, (step, again[step], first[step])
