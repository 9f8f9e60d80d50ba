"""Where the recipe meets processes and devices: the one place that knows about torch.distributed.

A single process (laptop CPU, one GPU) and a `torchrun` job go through the same functions; everything else
in `automoe.train` asks this module for its rank, its share of the data and its collectives.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .config import Recipe, RecipeError


@dataclass
class Runtime:
    rank: int
    world_size: int
    dp_rank: int  # which slice of every global batch this process reads
    dp_size: int
    device: torch.device
    setup: Any  # automoe.distributed DistributedSetup, or None for one process
    monitor: Any = None  # a gloo group that finds out which rank stopped answering when a collective fails

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: 'cuda' asked for, but no CUDA device is visible; use device: cpu")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_runtime(recipe: Recipe) -> Runtime:
    """Join the torchrun job when there is one, and build the distributed setup from `recipe.distributed`."""
    device = pick_device(recipe.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:  # one process: the whole model is here, nothing to set up
        ep_size = (recipe.distributed or {}).get("ep_size", 1)
        if isinstance(ep_size, int) and ep_size > 1:
            raise RecipeError(f"distributed.ep_size: {ep_size} needs {ep_size} processes, but this is one; launch with "
                              f"torchrun --nproc-per-node {ep_size} -m automoe.cli finetune ..., or drop distributed")
        return Runtime(0, 1, 0, 1, device, None)
    from automoe.distributed import create_distributed_setup_from_config

    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=recipe.train.collective_timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    monitor = dist.new_group(backend="gloo", timeout=timeout)
    try:
        setup = create_distributed_setup_from_config(dict(recipe.distributed or {}))
    except (ValueError, TypeError) as e:
        raise RecipeError(f"distributed: {e}") from e
    rank = dist.get_rank()
    # expert parallelism is orthogonal to data parallelism: every rank reads its own slice of the batch
    return Runtime(rank, world_size, rank, world_size, setup.device, setup, monitor)


def all_sum(values: list[float], rt: Runtime) -> list[float]:
    """Sum a few host numbers over all ranks (token counts, loss sums) in float64."""
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Total gradient norm over all parameters (the same on every rank), clipped to max_norm (0: only measured)."""
    from automoe.distributed.grad_norm import clip_grad_norm_

    return float(clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf))


def agree(rt: Runtime, problem: str | None) -> None:
    """Raise the same RecipeError on every rank when any rank found a problem (a check made by one rank, or one
    that may differ between ranks, must not leave the others waiting in the next collective)."""
    problems = [problem]
    if rt.distributed:
        problems = [None] * rt.world_size
        dist.all_gather_object(problems, problem)
    found = [(rank, p) for rank, p in enumerate(problems) if p]
    if found:
        rank, first = found[0]
        raise RecipeError(first if len(set(p for _, p in found)) == 1 else f"rank {rank}: {first}")


def gather(rt: Runtime, value: Any) -> list[Any]:
    """`value` of every rank, in rank order."""
    if not rt.distributed:
        return [value]
    out = [None] * rt.world_size
    dist.all_gather_object(out, value)
    return out


COLLECTIVE_FAILURE = re.compile(r"timed out|connection (closed|reset)|broken pipe|NCCL", re.IGNORECASE)


class RankStopped(RuntimeError):
    """A collective failed because another rank stopped answering."""


def explain_collective_failure(rt: Runtime, error: BaseException, where: str) -> BaseException:
    """The error to raise for a failed collective: which ranks stopped answering, found with a short
    monitored barrier on the gloo side group, or `error` itself when it is not a collective's failure."""
    if not rt.distributed or rt.monitor is None or not COLLECTIVE_FAILURE.search(str(error)):
        return error
    try:
        dist.monitored_barrier(group=rt.monitor, timeout=timedelta(seconds=10), wait_all_ranks=True)
        silent = "no rank (all answered a check afterwards)"
    except RuntimeError as e:
        found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(e))
        silent = f"rank {found.group(1)}" if found else f"another rank ({e})"
    return RankStopped(f"{where}: {silent} stopped answering; rank {rt.rank} gave up after train.collective_timeout_s "
                       f"or a lost connection ({error})")


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
