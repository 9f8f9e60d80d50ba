"""Resumable training state, saved with torch.distributed.checkpoint and committed atomically.

A checkpoint is written into a hidden `.step_N.tmp` directory and only renamed to `step_N` once every rank
has finished writing; a rename is atomic, so a `step_N` directory is always complete and a kill during a
save leaves the previous one usable. Old checkpoints are renamed away before they are deleted, for the
same reason. Model and optimizer go through DCP (sharded tensors, DTensors and all); the scheduler, step,
data position and RNG states of each rank go in a small per-rank file.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .runtime import Runtime, barrier

STEP_DIR = re.compile(r"^step_(\d+)$")
# Fault injection for the kill-during-save test: "STEP:SECONDS" sleeps that long in the save of that step,
# after the tensors are written and before the checkpoint is committed.
SAVE_DELAY_ENV = "AUTOMOE_TEST_SAVE_DELAY"


def _injected_delay(step: int) -> None:
    at, _, seconds = os.environ.get(SAVE_DELAY_ENV, "").partition(":")
    if at and int(at) == step:
        time.sleep(float(seconds))


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")) + [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any],
    rt: Runtime, keep: int,
) -> Path:
    """Write step `step` and commit it; keep the newest `keep` checkpoints."""
    tmp, final = root / f".step_{step:08d}.tmp", root / f"step_{step:08d}"
    if rt.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(rt)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process without a process group is a supported case, not a problem
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _injected_delay(step)
    torch.save({**extra, "step": step, "rng": rng_state()}, tmp / f"rank{rt.rank:05d}.pt")
    barrier(rt)
    if rt.is_main:
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_tree(root)
        for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            trash = root / f".trash.{old.name}"
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    barrier(rt)
    return final


def clean_partial(root: Path, rt: Runtime) -> list[Path]:
    """Remove uncommitted leftovers of an interrupted save (never a committed checkpoint)."""
    removed = []
    if rt.is_main and root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step_") or p.name.startswith(".trash."):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    barrier(rt)
    return removed


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime
) -> dict[str, Any]:
    """Restore model and optimizer in place; return this rank's extra state (step, scheduler, RNG, ...)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_file = path / f"rank{rt.rank:05d}.pt"
    if not rank_file.is_file():
        raise RuntimeError(f"{path} has no state for rank {rt.rank}: resume with the same number of processes")
    extra = torch.load(rank_file, weights_only=False)
    set_rng_state(extra["rng"])
    return extra
