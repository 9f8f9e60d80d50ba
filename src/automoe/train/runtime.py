"""Where the recipe meets processes and devices: the one place that knows about torch.distributed.

A single process (laptop CPU, one GPU) and a `torchrun` job go through the same functions; everything else
in `automoe.train` asks this module for its rank, its share of the data and its collectives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
    if world_size == 1 and recipe.distributed is None:
        return Runtime(0, 1, 0, 1, device, None)
    try:
        from automoe.distributed import create_distributed_setup_from_config
    except ImportError as e:
        raise RecipeError(f"distributed: this automoe has no distributed support yet ({e})") from e
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized() and world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    setup = create_distributed_setup_from_config(dict(recipe.distributed or {}))
    rank = dist.get_rank() if dist.is_initialized() else 0
    # expert parallelism is orthogonal to data parallelism: every rank reads its own slice of the batch
    return Runtime(rank, world_size, rank, world_size, device, setup)


def all_sum(values: list[float], rt: Runtime) -> list[float]:
    """Sum a few host numbers over all ranks (token counts, loss sums) in float64."""
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
