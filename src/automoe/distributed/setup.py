"""DistributedSetup: what the user asks for (a dict), checked against the live process group, plus the mesh.

The mesh has three named dimensions, ("dp_replicate", "ep_shard", "ep"): HSDP replicas across nodes, and
inside each replica the data-parallel shard group split into `ep` (experts are divided over it) times
`ep_shard` (the remaining ranks, which FSDP-shard each expert shard further). `dp_shard` is the flattened
("ep_shard", "ep"): non-expert weights are FSDP-sharded over it, so expert parallelism never reduces data
parallelism: every rank consumes its own data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

STRATEGIES = ("fsdp2",)
CHECKPOINTING = ("off", "full", "selective")
DISPATCHERS = ("auto", "local", "all_to_all")
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def _dtype(key: str, value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"distributed setup: {key}={value!r} is not a dtype; use one of {sorted(_DTYPES)} or None.")


@dataclass(frozen=True)
class DistributedSetup:
    """How a model is spread over the ranks of the default process group. Build it with
    `create_distributed_setup_from_config`; pass it as `distributed_setup=` to from_pretrained/from_config."""

    strategy: str = "fsdp2"
    ep_size: int = 1
    dp_replicate_size: int = 1
    activation_checkpointing: str = "off"
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    reshard_after_forward: bool = True
    dispatcher: str = "local"
    dispatch_chunks: int = 1
    mesh: DeviceMesh | None = field(default=None, compare=False, repr=False)
    dp_shard_mesh: DeviceMesh | None = field(default=None, compare=False, repr=False)

    @property
    def world_size(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def ep_shard_size(self) -> int:
        return self.world_size // (self.dp_replicate_size * self.ep_size)

    @property
    def device(self) -> torch.device:
        if self.mesh.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.mesh.device_type, torch.cuda.current_device())

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.mesh["ep"]

    @property
    def dp_mesh(self) -> DeviceMesh:
        """FSDP mesh of non-expert weights: the whole data-parallel world (2D for HSDP)."""
        return self.mesh["dp_replicate", "dp_shard"] if self.dp_replicate_size > 1 else self.dp_shard_mesh

    @property
    def expert_dp_mesh(self) -> DeviceMesh:
        """FSDP mesh of expert weights: the ranks holding the same expert shard."""
        return self.mesh["dp_replicate", "ep_shard"] if self.dp_replicate_size > 1 else self.mesh["ep_shard"]

    def check_num_experts(self, num_experts: int) -> None:
        if num_experts % self.ep_size:
            raise ValueError(
                f"distributed setup: ep_size={self.ep_size} does not divide the model's {num_experts} experts; "
                f"choose an ep_size that divides {num_experts} (and the world size {self.world_size})."
            )


def create_distributed_setup_from_config(config: dict[str, Any]) -> DistributedSetup:
    """Validate `config` against the live process group and build the device mesh.

    Keys: strategy ("fsdp2"), ep_size, dp_replicate_size, activation_checkpointing ("off", "full",
    "selective"), param_dtype, reduce_dtype (FSDP2 mixed precision; None keeps the weights' dtype),
    reshard_after_forward, dispatcher: how MoE tokens reach their experts, "auto" (the default: "local" at
    ep_size 1, else "all_to_all"), "local" (ep_size 1 only) or "all_to_all" (over NCCL on GPUs, gloo on CPU;
    at ep_size 1 a loopback through the same code, to measure it), dispatch_chunks (all_to_all: the tokens of a
    layer go in that many pipelined chunks, a chunk's all-to-all overlapping the previous chunk's experts on
    CUDA; default 1). Unknown keys and sizes the world size does not allow are errors.
    """
    if not isinstance(config, dict):
        raise TypeError(f"create_distributed_setup_from_config takes a dict, not {type(config).__name__}.")
    known = {f.name for f in fields(DistributedSetup)} - {"mesh", "dp_shard_mesh"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"distributed setup: unknown key(s) {unknown}; known keys are {sorted(known)}.")
    opts = dict(config)
    strategy = opts.get("strategy", "fsdp2")
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed setup: unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
    checkpointing = opts.get("activation_checkpointing", "off")
    checkpointing = {False: "off", None: "off", True: "full"}.get(checkpointing, checkpointing)
    if checkpointing not in CHECKPOINTING:
        raise ValueError(
            f"distributed setup: activation_checkpointing={checkpointing!r}; choose one of {CHECKPOINTING}."
        )
    opts["activation_checkpointing"] = checkpointing
    for key in ("ep_size", "dp_replicate_size", "dispatch_chunks"):
        value = opts.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"distributed setup: {key} must be a positive integer, not {value!r}.")
    for key in ("param_dtype", "reduce_dtype"):
        opts[key] = _dtype(key, opts.get(key))
    if not isinstance(opts.get("reshard_after_forward", True), bool):
        raise ValueError(
            f"distributed setup: reshard_after_forward must be true or false, not {opts['reshard_after_forward']!r}."
        )
    opts["dispatcher"] = _dispatcher(opts.get("dispatcher", "auto"), opts.get("ep_size", 1))
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "distributed setup: no process group. Launch with torchrun and call "
            "torch.distributed.init_process_group() (backend 'nccl' on GPUs, 'gloo' on CPU) before "
            "create_distributed_setup_from_config."
        )
    world = dist.get_world_size()
    ep, replicate = opts.get("ep_size", 1), opts.get("dp_replicate_size", 1)
    if world % (ep * replicate):
        raise ValueError(
            f"distributed setup: world size {world} is not divisible by dp_replicate_size ({replicate}) x "
            f"ep_size ({ep}) = {ep * replicate}; choose sizes whose product divides {world}."
        )
    opts["mesh"], opts["dp_shard_mesh"] = _build_mesh(world, replicate, ep)
    return DistributedSetup(**opts)


def _dispatcher(value: Any, ep_size: int) -> str:
    if value not in DISPATCHERS:
        raise ValueError(f"distributed setup: unknown dispatcher {value!r}; choose one of {DISPATCHERS}.")
    if value == "auto":
        return "local" if ep_size == 1 else "all_to_all"
    if value == "local" and ep_size > 1:
        raise ValueError(f"distributed setup: dispatcher 'local' keeps every expert on each rank, so it needs "
                         f"ep_size 1, not {ep_size}; use 'auto' or 'all_to_all'.")
    return value


def _build_mesh(world: int, replicate: int, ep: int) -> tuple[DeviceMesh, DeviceMesh]:
    """The root mesh and its flattened ("ep_shard", "ep") dimension, kept since slicing a flattened dimension
    out of the root is being deprecated in torch."""
    backend = dist.get_backend()
    if "nccl" in str(backend):
        device_type = "cuda"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    else:
        device_type = "cpu"
    mesh = init_device_mesh(
        device_type, (replicate, world // (replicate * ep), ep), mesh_dim_names=("dp_replicate", "ep_shard", "ep")
    )
    return mesh, mesh["ep_shard", "ep"]._flatten("dp_shard")
