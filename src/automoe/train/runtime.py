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
    if world_size == 1:  # one process: the whole model is here, nothing to set up
        return Runtime(0, 1, 0, 1, device, None)
    try:
        from automoe.distributed import create_distributed_setup_from_config
    except ImportError as e:
        raise RecipeError(f"distributed: this automoe has no distributed support yet ({e})") from e
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        setup = create_distributed_setup_from_config(dict(recipe.distributed or {}))
    except (ValueError, TypeError) as e:
        raise RecipeError(f"distributed: {e}") from e
    rank = dist.get_rank()
    # expert parallelism is orthogonal to data parallelism: every rank reads its own slice of the batch
    return Runtime(rank, world_size, rank, world_size, setup.device, setup)


def all_sum(values: list[float], rt: Runtime) -> list[float]:
    """Sum a few host numbers over all ranks (token counts, loss sums) in float64."""
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Total gradient norm over all parameters, clipped to max_norm (0: only measured). Under EP + FSDP2 the
    gradients are DTensors on different meshes (experts over `ep`, the rest over `dp_shard`), which one
    torch.nn.utils.clip_grad_norm_ call cannot mix, so each mesh's norm is reduced on its own."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if hasattr(p.grad, "device_mesh") else None
            groups.setdefault(key, []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        squares.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).double() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=torch.float64)
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grads in groups.values():
            torch._foreach_mul_(grads, coef.to(grads[0].device, torch.float32))
    return float(total)


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
