"""Resumable training state, saved with torch.distributed.checkpoint, verified and committed atomically.

A checkpoint is written into a hidden `.step_N.tmp` directory and only renamed to `step_N` once every rank
has finished writing and `manifest.json` lists every file with its size and SHA-256; a rename is atomic, so a
`step_N` directory is always complete and a kill during a save leaves the previous one usable. On resume the
files are checked against the manifest (the ranks share the hashing); a damaged checkpoint is moved aside to
`damaged.step_N` and the previous verified one is used, with a message. Old checkpoints are renamed away before
they are deleted. Model and optimizer go through DCP (sharded tensors, DTensors and all); the step and the RNG
states of each rank go in a small per-rank file; the manifest also keeps the recipe, for --resume to compare.

The checksum is hashlib's SHA-256: the standard library, no dependency, and hardware-accelerated (SHA-NI) on
current CPUs at about a GB/s per rank, which is the price of reading the files once more; a faster
non-cryptographic hash (xxhash) would be one more package to install everywhere for a step that is not the
bottleneck of a save.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .config import RecipeError
from .faults import pause_point
from .runtime import Runtime, agree, barrier, gather

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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


def _write_manifest(tmp: Path, step: int, recipe: dict[str, Any], rt: Runtime) -> None:
    """Every rank hashes its share of the files; rank 0 writes the manifest."""
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    mine = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_of(tmp / name)}
            for i, name in enumerate(files) if i % rt.world_size == rt.rank}
    listed: dict[str, Any] = {}
    for part in gather(rt, mine):
        listed.update(part)
    if rt.is_main:
        manifest = {"step": step, "world_size": rt.world_size, "recipe": recipe, "files": dict(sorted(listed.items()))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any],
    recipe: dict[str, Any], rt: Runtime, keep: int,
) -> Path:
    """Write step `step`, list its files in the manifest and commit it; keep the newest `keep` checkpoints."""
    tmp, final = root / f".step_{step:08d}.tmp", root / f"step_{step:08d}"
    if rt.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(rt)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    problem = None
    try:
        with warnings.catch_warnings():  # one process without a process group is a supported case, not a problem
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save({**extra, "step": step, "rng": rng_state()}, tmp / f"rank{rt.rank:05d}.pt")
    except (OSError, RuntimeError, CheckpointException) as e:  # DCP raises CheckpointException on every rank
        cause = "; ".join(f"rank {r}: {exc!r}" for r, (exc, _) in e.failures.items()) if isinstance(
            e, CheckpointException) else repr(e)
        free = shutil.disk_usage(root).free / 2**30
        problem = (f"the checkpoint of step {step} could not be written to {tmp}: {cause}\nIs the disk full? "
                   f"{free:.2f} GiB free there. The earlier checkpoints are kept; free space, then --resume.")
    if problem is not None and rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    agree(rt, problem)
    pause_point(f"save_{step}")
    barrier(rt)
    _write_manifest(tmp, step, recipe, rt)
    barrier(rt)
    if rt.is_main:
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_tree(root)
        for old in complete_checkpoints(root)[:-keep]:
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


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a committed checkpoint; a RecipeError when it is missing or unreadable."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise RecipeError(f"{path} has no {MANIFEST} (written by an older automoe, or damaged)") from e
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path / MANIFEST} is unreadable: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise RecipeError(f"{path / MANIFEST} is not a checkpoint manifest")
    return manifest


def verify_checkpoint(path: Path, rt: Runtime) -> str | None:
    """None when every file the manifest lists is there with its size and checksum, else the first problem
    (every rank returns the same answer)."""
    try:
        files = read_manifest(path)["files"]
    except RecipeError as e:
        return str(e)
    problem = None
    for i, (name, want) in enumerate(sorted(files.items())):
        if i % rt.world_size != rt.rank:
            continue
        file = path / name
        if not file.is_file():
            problem = f"{file} is missing"
        elif file.stat().st_size != want["bytes"]:
            problem = f"{file} has {file.stat().st_size} bytes, the manifest says {want['bytes']}"
        elif sha256_of(file) != want["sha256"]:
            problem = f"{file} does not match its checksum (its bytes changed after the save)"
        if problem:
            break
    return next((p for p in gather(rt, problem) if p), None)


def newest_verified_checkpoint(root: Path, rt: Runtime, say) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint that verifies, with its manifest; damaged newer ones are moved aside, with a message."""
    damaged = []
    for path in reversed(complete_checkpoints(root)):
        problem = verify_checkpoint(path, rt)
        if problem is None:
            manifest = read_manifest(path)
            if manifest["world_size"] != rt.world_size:
                raise RecipeError(f"--resume: {path} was written by {manifest['world_size']} processes and this run "
                                  f"has {rt.world_size}; resume with --nproc-per-node {manifest['world_size']}")
            if damaged:
                say(f"resuming from {path}, the newest checkpoint that verifies")
            return path, manifest
        aside = root / f"damaged.{path.name}"
        say(f"--resume: {path} is damaged: {problem}; moving it to {aside} and trying the previous checkpoint")
        if rt.is_main:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
        barrier(rt)
        damaged.append(f"{path.name}: {problem}")
    if damaged:
        raise RecipeError(f"--resume: no checkpoint in {root} verifies:\n  " + "\n  ".join(damaged))
    raise RecipeError(f"--resume: no complete checkpoint in {root}")


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime
) -> dict[str, Any]:
    """Restore model and optimizer in place; return this rank's extra state (step, RNG, ...)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path / f"rank{rt.rank:05d}.pt", weights_only=False)
    set_rng_state(extra["rng"])
    return extra
