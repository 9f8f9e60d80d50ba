"""from_pretrained / from_config with a DistributedSetup: the model is built with its weights on the meta
device, parallelised (EP + FSDP2), and only then each rank allocates and fills its own shards.

Buffers are small and replicated, so they are computed for real while building and restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
from types import MethodType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.modules.module import register_module_parameter_registration_hook
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..checkpoint.load import load_sharded_checkpoint
from ..checkpoint.save import save_pretrained_distributed
from ..optimize import optimize_model
from ..options import AutoMoEOptions
from .parallelize import parallelize_model
from .setup import DistributedSetup

_BUILD_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "experts_implementation")
_REFUSED_KWARGS = ("device_map", "tp_plan", "tp_size", "quantization_config", "load_in_8bit", "load_in_4bit")


def _to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    if param is None or param.device.type == "meta":
        return None
    return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters are created on the meta device (no memory), buffers as usual: torch's parameter registration
    hook, removed on exit (nn.Module itself is not patched)."""
    handle = register_module_parameter_registration_hook(_to_meta)
    try:
        yield
    finally:
        handle.remove()


def _check_kwargs(hf_kwargs: dict[str, Any]) -> None:
    refused = sorted(k for k in hf_kwargs if k in _REFUSED_KWARGS)
    if refused:
        raise ValueError(f"{refused} cannot be combined with distributed_setup, which decides where every weight "
                         "lives; drop them.")


def _build(config, setup: DistributedSetup, options: AutoMoEOptions, build_kwargs: dict[str, Any]):
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **build_kwargs)
    model = optimize_model(model, options)
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    parallelize_model(model, setup)
    model.to_empty(device=setup.device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
    model.save_pretrained = MethodType(save_pretrained_distributed, model)
    return model


def _chunk(n: int, parts: int, index: int) -> tuple[int, int]:
    """torch.chunk's split of n rows into `parts` (what FSDP2 shards by): ceil-sized, trailing ones may be empty."""
    size = -(-n // parts)
    start = min(index * size, n)
    return start, min(start + size, n)


def rows_function(setup: DistributedSetup):
    """rows_of(dtensor): the global rows along dim 0 this rank holds of a parameter sharded by parallelize."""
    mesh = setup.mesh

    def rows_of(tensor: DTensor) -> tuple[int, int]:
        if "ep" in (tensor.device_mesh.mesh_dim_names or ()):
            per_rank = tensor.shape[0] // setup.ep_size
            first = mesh["ep"].get_local_rank() * per_rank
            start, end = _chunk(per_rank, setup.ep_shard_size, mesh["ep_shard"].get_local_rank())
            return first + start, first + end
        return _chunk(tensor.shape[0], setup.dp_shard_mesh.size(), setup.dp_shard_mesh.get_local_rank())

    return rows_of


def shard_coordinates(tensor: torch.Tensor) -> tuple[int, ...]:
    """This rank's coordinates on the mesh dimensions that shard `tensor` (none for a plain tensor): equal on
    every rank holding the same shard, e.g. on all HSDP replicas, and different between shards."""
    if not isinstance(tensor, DTensor):
        return ()
    mesh = tensor.device_mesh
    return tuple(mesh.get_local_rank(dim) for dim, placement in enumerate(tensor.placements) if placement.is_shard())


def _common_seed(setup: DistributedSetup) -> int:
    """One seed drawn from rank 0's random stream and shared, so that ranks seeded differently by the user still
    initialise equal shards alike."""
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).to(setup.device)
    dist.broadcast(seed, src=0)
    return int(seed.item())


@torch.no_grad()
def init_local_shards(model: PreTrainedModel, setup: DistributedSetup) -> None:
    """HF's own per-module initialisation, run on each rank's shards. Each module draws from a stream seeded by
    its position in the model and its tensors' shard coordinates: no two shards repeat, and the ranks that hold
    the same shard (HSDP replicas; every rank, for a replicated tensor) draw the same weights.
    Embedding padding rows are zeroed where this rank holds them."""
    rows_of = rows_function(setup)
    devices = [setup.device] if setup.device.type == "cuda" else []
    seed = _common_seed(setup)
    with torch.random.fork_rng(devices=devices, device_type=setup.device.type):
        for index, module in enumerate(model.modules()):
            coordinates = tuple(shard_coordinates(p) for p in module._parameters.values() if p is not None)
            # hash of a tuple of ints: the same in every process (only str/bytes hashes are salted per process)
            torch.manual_seed(hash((seed, index, coordinates)) % 2**63)
            sharded = {n: p for n, p in module._parameters.items() if isinstance(p, DTensor)}
            padding_idx = getattr(module, "padding_idx", None) if isinstance(module, nn.Embedding) else None
            try:
                for name, param in sharded.items():
                    module._parameters[name] = param.to_local()
                if padding_idx is not None:
                    module.padding_idx = None
                model._init_weights(module)
            finally:
                module._parameters.update(sharded)
                if padding_idx is not None:
                    module.padding_idx = padding_idx
            if padding_idx is not None:
                weight = module.weight
                start, end = rows_of(weight) if isinstance(weight, DTensor) else (0, module.num_embeddings)
                if start <= padding_idx < end:
                    (weight.to_local() if isinstance(weight, DTensor) else weight)[padding_idx - start].zero_()


def build_from_config_distributed(
    config, setup: DistributedSetup, options: AutoMoEOptions, **hf_kwargs: Any
) -> PreTrainedModel:
    """AutoMoEForCausalLM.from_config(config, distributed_setup=setup): randomly initialised shards."""
    _check_kwargs(hf_kwargs)
    model = _build(config, setup, options, hf_kwargs)
    init_local_shards(model, setup)
    return model


def load_pretrained_distributed(
    path: str | os.PathLike, setup: DistributedSetup, options: AutoMoEOptions, **hf_kwargs: Any
) -> PreTrainedModel:
    """AutoMoEForCausalLM.from_pretrained(path, distributed_setup=setup): each rank reads only its slices."""
    _check_kwargs(hf_kwargs)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"distributed loading reads a local checkpoint directory; {path!r} is not one "
                         "(download it first, e.g. with huggingface_hub.snapshot_download).")
    build_kwargs = {k: hf_kwargs.pop(k) for k in _BUILD_KWARGS if k in hf_kwargs}
    build_kwargs.pop("torch_dtype", None) if "dtype" in build_kwargs else None
    config = AutoConfig.from_pretrained(path, **hf_kwargs)
    dtype = build_kwargs.pop("dtype", build_kwargs.pop("torch_dtype", "auto"))
    if dtype == "auto" or dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
    model = _build(config, setup, options, {**build_kwargs, "dtype": dtype})
    load_sharded_checkpoint(model, path, rows_function(setup))
    return model
