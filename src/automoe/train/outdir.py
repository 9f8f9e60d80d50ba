"""The output directory of a run: writable before anything heavy starts, one run at a time (a lock file), an
earlier run never replaced unless the recipe says so, and the final export moved into place whole."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .config import Recipe, RecipeError
from .runtime import Runtime, agree

LOCK = ".automoe.lock"
# what a run writes into output.dir; output.overwrite removes these and nothing else
RUN_ENTRIES = ("checkpoints", "final", "metrics.jsonl", "loss.png", "tensorboard", "init")
EXPORT_TMP = ".final.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class RunLock:
    """`output.dir/.automoe.lock` holds the pid and host of the run using the directory. A lock whose pid is dead
    on this host is stale (a killed run) and is taken over, with a message."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK
        self.held = False

    def acquire(self, say) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                    pid, host = int(holder["pid"]), str(holder["host"])
                except (OSError, ValueError, KeyError, TypeError):
                    pid, host = -1, me["host"]  # a torn lock file: its writer died while writing it
                if host == me["host"] and (pid < 0 or not _pid_alive(pid)):
                    say(f"output.dir: removing the stale lock {self.path} of a run that is gone (pid {pid})")
                    self.path.unlink(missing_ok=True)
                    continue
                raise RecipeError(f"output.dir: another run (pid {pid} on {host}) is using {self.path.parent}; "
                                  f"wait for it, choose another output.dir, or delete {self.path} if that run is "
                                  "gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RecipeError(f"output.dir: could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _prepare(recipe: Recipe, resume: bool, lock: RunLock, say) -> None:
    out = Path(recipe.output.dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".automoe-write-test-"):
            pass
    except OSError as e:
        raise RecipeError(f"output.dir: cannot write to {out} ({e.strerror or e}); choose a writable output.dir") from e
    lock.acquire(say)
    shutil.rmtree(out / EXPORT_TMP, ignore_errors=True)  # an export that was killed half-way
    if resume:
        return
    earlier = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if earlier and not recipe.output.overwrite:
        raise RecipeError(
            f"output.dir: {out} is not empty (it holds {', '.join(earlier[:6])}{', ...' if len(earlier) > 6 else ''}); "
            "pass --resume to continue the run in it, set output.overwrite: true (--output.overwrite true) to replace "
            "that run, or choose another output.dir")
    replaced = [name for name in RUN_ENTRIES if (out / name).exists()]
    if replaced:
        say(f"output.overwrite is true: removing the earlier run's {', '.join(replaced)} in {out}")
    for name in replaced:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def prepare_output(recipe: Recipe, resume: bool, rt: Runtime, say) -> RunLock:
    """Rank 0 checks and locks output.dir; every rank gets the same error when that fails."""
    lock = RunLock(Path(recipe.output.dir))
    problem = None
    if rt.is_main:
        try:
            _prepare(recipe, resume, lock, say)
        except RecipeError as e:
            problem = str(e)
    agree(rt, problem)
    return lock


def commit_export(tmp: Path, final: Path) -> None:
    """Move a fully written export into place (a rename), replacing an earlier one."""
    old = final.with_name(".final.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
