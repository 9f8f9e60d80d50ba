"""Nothing lost, nothing silently wrong: faults of a careful user and a QA engineer (issue 19), each a run that
must stop with a message naming the problem and the fix, or go on correctly, never a wrong model with exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_finetune import QUICK, finetune, losses, run_group

from automoe import AutoMoEForCausalLM
from automoe.checkpoint.safetensors_io import SafetensorsFile
from automoe.train.cli import main
from automoe.train.config import load_recipe
from automoe.train.model import build_config, build_model
from automoe.train.runtime import Runtime
from automoe.train.state import complete_checkpoints, load_checkpoint
from automoe.train.tokenizer import build_char_tokenizer
from automoe.train.trainer import make_optimizer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV_1T = {"OMP_NUM_THREADS": "1"}


def strict_records(out: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"bare {name} in metrics.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny_checkpoint(path: Path, tokenizer: bool = True) -> Path:
    recipe = load_recipe()
    tok = build_char_tokenizer()
    AutoMoEForCausalLM.from_config(build_config(recipe.model, tok, 0.0)).save_pretrained(path)
    if tokenizer:
        tok.save_pretrained(path)
    return path


def test_truncated_safetensors_is_refused_by_the_sharded_loader(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated: tensor .* ends at byte"):
        SafetensorsFile(str(ckpt))
    pytest.importorskip("automoe.distributed")
    cmd = [*TORCHRUN, "-m", "automoe.cli", "finetune", *QUICK, "--train.max_steps", "2", "--model.path", str(ckpt),
           "--model.tokenizer", "model", "--output.dir", str(tmp_path / "run"), "--distributed", "{ep_size: 2}"]
    rc, log = run_group(cmd, timeout=240)
    assert rc != 0, log
    assert "is truncated: tensor" in log and "model.safetensors" in log
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_lr_1e36_stops_without_a_nan_checkpoint_or_export(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(QUICK + ["--optim.lr", "1e36", "--train.max_steps", "12", "--train.save_every", "1",
                       "--output.keep_checkpoints", "20", "--output.export", "true", "--output.dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "NaN or infinite loss or gradient norm" in err and "Lower optim.lr" in err
    records = strict_records(out)  # strict JSON: non-finite numbers are null
    assert len([r for r in records if r.get("skipped")]) == 4
    assert not (out / "final").exists()
    rt = Runtime(0, 1, 0, 1, torch.device("cpu"), None)
    recipe = load_recipe(overrides=[("train.batch_size", 4)])
    for ckpt in complete_checkpoints(out / "checkpoints"):  # every checkpoint kept holds a finite model
        model = build_model(recipe.model, build_char_tokenizer(), rt, 0, 0.0, tmp_path / "unused")
        load_checkpoint(ckpt, model, make_optimizer(recipe, model), rt)
        assert all(torch.isfinite(p).all() for p in model.parameters()), ckpt


def test_damaged_newest_checkpoint_falls_back_to_the_previous_verified_one(tmp_path, capsys):
    out = tmp_path / "run"
    base = QUICK + ["--train.max_steps", "6", "--train.save_every", "2", "--output.keep_checkpoints", "3",
                    "--output.dir", str(out)]
    assert main(base) == 0
    reference = losses(out)
    root = out / "checkpoints"
    newest = complete_checkpoints(root)[-1]
    data = next(newest.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = os.urandom(64)  # random bytes inside the tensor data
    data.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(base + ["--resume"]) == 0
    log = capsys.readouterr().out
    assert "step_00000006 is damaged" in log and "does not match its checksum" in log
    assert (root / "damaged.step_00000006").is_dir()
    again = losses(out)
    for step in (5, 6):
        assert abs(again[step] - reference[step]) <= 1e-6

    # a deleted rank file, then every checkpoint damaged: the message names the files, no raw traceback
    for ckpt in complete_checkpoints(root):
        (ckpt / "rank00000.pt").unlink()
    assert main(base + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "rank00000.pt is missing" in err


def test_two_runs_into_one_directory(tmp_path, capsys):
    out = tmp_path / "run"
    args = QUICK + ["--train.max_steps", "2", "--train.save_every", "2", "--output.dir", str(out)]
    assert main(args) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 2  # a second fresh run does not wipe the first
    assert "is not empty" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before and complete_checkpoints(out / "checkpoints")

    # a live run holds the lock: the second one stops; a dead one's lock is stale and taken over
    lock = out / ".automoe.lock"
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": helper.pid, "host": os.uname().nodename}))
        assert main(args + ["--resume"]) == 2
        assert f"another run (pid {helper.pid}" in capsys.readouterr().err
    finally:
        helper.kill()
        helper.wait()
    assert main(args + ["--resume", "--train.max_steps", "3"]) == 0
    assert "stale lock" in capsys.readouterr().out
    assert not lock.exists()
    assert main(args + ["--output.overwrite", "true"]) == 0  # asked for explicitly
    assert sorted(losses(out)) == [1, 2]


def test_sigterm_saves_the_current_step_and_resume_gives_the_uninterrupted_losses(tmp_path):
    base = QUICK + ["--train.max_steps", "8", "--train.save_every", "0"]
    finetune(base + ["--output.dir", str(tmp_path / "straight")]).stdout.close()
    reference = losses(tmp_path / "straight")

    out = tmp_path / "stopped"
    proc = finetune(base + ["--output.dir", str(out)], env={"AUTOMOE_TEST_PAUSE": "step_4_rank0=3"}, wait=False)
    deadline = time.time() + 200
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # during the pause before step 4: step 4 is the one saved
    log, _ = proc.communicate(timeout=200)
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "stopped by SIGTERM after step 4" in log and "--resume" in log
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step_00000004"]
    finetune(base + ["--output.dir", str(out), "--resume"]).stdout.close()
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 9))
    for step in resumed:
        assert abs(resumed[step] - reference[step]) <= 1e-6, step


def test_ranks_with_different_data_sizes_stop_at_the_start(tmp_path):
    pytest.importorskip("automoe.distributed")
    rows = [json.dumps({"prompt": w, "completion": w[::-1]}) for w in ("alpha", "beta", "gamma", "delta") * 20]
    for rank, n in ((0, 40), (1, 80)):
        (tmp_path / f"data{rank}.jsonl").write_text("\n".join(rows[:n]) + "\n")
    script = tmp_path / "per_rank.py"  # each rank reads its own file, as on nodes whose local copies differ
    script.write_text("import os, sys\nfrom automoe.cli import main\nargs = sys.argv[1:]\n"
                      "args[args.index('--data.train') + 1] %= os.environ['RANK']\nsys.exit(main(args))\n")
    rc, log = run_group([*TORCHRUN, str(script), "finetune", *QUICK, "--train.max_steps", "0", "--train.epochs", "1",
                         "--data.max_seq_len", "16", "--distributed", "{ep_size: 2}",
                         "--data.train", str(tmp_path / "data%s.jsonl"), "--output.dir", str(tmp_path / "plan")],
                        timeout=240)
    assert rc != 0 and "the ranks disagree on the step plan" in log, log
    assert "rank 0: 40 packed rows" in log and "rank 1: 80 packed rows" in log


def test_a_rank_that_stops_answering_is_named_within_the_timeout(tmp_path):
    pytest.importorskip("automoe.distributed")
    cmd = [*TORCHRUN, "-m", "automoe.cli", "finetune", *QUICK, "--train.max_steps", "4", "--distributed",
           "{ep_size: 2}", "--train.collective_timeout_s", "5", "--output.dir", str(tmp_path / "hang")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "AUTOMOE_TEST_PAUSE": "step_2_rank1=120"})
    try:
        log, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0, log
    assert "step 2: rank 1 stopped answering" in log, log


def test_resume_applies_or_rejects_a_changed_key(tmp_path, capsys):
    out = tmp_path / "run"
    base = QUICK + ["--train.max_steps", "4", "--train.save_every", "2", "--schedule.decay", "constant",
                    "--output.dir", str(out)]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base + ["--resume", "--data.max_seq_len", "32"]) == 2
    assert "data.max_seq_len: 64 -> 32" in capsys.readouterr().err
    assert main(base + ["--resume", "--optim.lr", "0.1", "--train.max_steps", "6"]) == 0
    assert "applying the changed keys: optim.lr 0.003 -> 0.1" in capsys.readouterr().out
    lrs = {r["step"]: r["lr"] for r in strict_records(out) if "lr" in r}
    assert lrs[4] == pytest.approx(0.003) and lrs[5] == pytest.approx(0.1) and lrs[6] == pytest.approx(0.1)


def test_paths_and_files_are_checked_up_front(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(QUICK + ["--output.dir", str(blocker / "run")]) == 2
    assert "output.dir: cannot write to" in capsys.readouterr().err

    # a torn last line in metrics.jsonl (a kill mid-write) does not stop --resume
    out = tmp_path / "run"
    base = QUICK + ["--train.max_steps", "2", "--train.save_every", "2", "--output.dir", str(out)]
    assert main(base) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert main(base + ["--resume", "--train.max_steps", "3"]) == 0
    assert sorted(losses(out)) == [1, 2, 3]

    # a checkpoint without a tokenizer, with model.tokenizer: model
    ckpt = tiny_checkpoint(tmp_path / "no_tok", tokenizer=False)
    capsys.readouterr()
    assert main(QUICK + ["--model.path", str(ckpt), "--model.tokenizer", "model", "--output.dir",
                         str(tmp_path / "r2")]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err


def test_a_full_disk_is_named_and_keeps_the_earlier_checkpoints(tmp_path):
    import resource

    out = tmp_path / "run"
    args = [sys.executable, "-m", "automoe.cli", "finetune", *QUICK, "--train.max_steps", "2", "--train.save_every",
            "1", "--output.dir", str(out)]

    def limit():  # files above 2 MB cannot be written, as on a full disk (the step checkpoint is ~3 MB)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))

    proc = subprocess.run(args, preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "the checkpoint of step 1 could not be written" in proc.stderr and "Is the disk full?" in proc.stderr
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".step_")]


def test_a_kill_during_the_final_export_leaves_no_half_export(tmp_path):
    out = tmp_path / "run"
    base = QUICK + ["--train.max_steps", "2", "--train.save_every", "2", "--output.export", "true",
                    "--output.dir", str(out)]
    proc = finetune(base, env={"AUTOMOE_TEST_PAUSE": "export=60"}, wait=False)
    deadline = time.time() + 200
    try:
        while not (out / ".final.tmp" / "model.safetensors").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert not (out / "final").exists()
    # the last step was checkpointed: --resume trains nothing again, exports, and removes the leftover
    proc = finetune(base + ["--resume"], wait=False)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "(step 2 of 2)" in log, log
    assert sorted(losses(out)) == [1, 2]
    assert not (out / ".final.tmp").exists()
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (out / "final").iterdir()}


def test_sigterm_under_torchrun_saves_the_same_step_on_every_rank(tmp_path):
    pytest.importorskip("automoe.distributed")
    out = tmp_path / "run"
    cmd = [*TORCHRUN, "-m", "automoe.cli", "finetune", *QUICK, "--train.max_steps", "6", "--distributed",
           "{ep_size: 2}", "--output.dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "AUTOMOE_TEST_PAUSE": "step_3_rank0=3"})
    try:
        deadline = time.time() + 200
        while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: the launcher and every worker
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0, log
    assert "stopped by SIGTERM after step 3" in log, log
    (ckpt,) = complete_checkpoints(out / "checkpoints")
    assert ckpt.name == "step_00000003" and len(list(ckpt.glob("rank*.pt"))) == 2
    rc, log = run_group(cmd + ["--resume"], timeout=240)
    assert rc == 0 and "(step 3 of 6)" in log, log
    assert sorted(losses(out)) == list(range(1, 7))
