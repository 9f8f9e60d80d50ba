"""peft's LoRA on an expert-parallel (+ FSDP2) automoe model: each rank holds its experts' adapters, every
adapter gradient is that of the mean loss over all ranks, and save_pretrained writes peft's standard file.

Usage, on every rank, after loading with a DistributedSetup::

    model = get_peft_model(model, lora_config)       # peft code unchanged
    distribute_adapters(model, setup)                     # before building the optimizer: it replaces parameters
    ...                                              # train; model.save_pretrained(out) is collective

peft's expert adapters are lora_A [E*r, in] (rows e*r .. e*r+r-1 are expert e's) and lora_B [out, r*E] (column
j*E + e is column j of expert e's B). Each becomes a DTensor on the `ep` mesh of those same global shapes: lora_A
Shard(0), lora_B _StridedShard(1, split_factor=r), i.e. each of lora_B's r column blocks of E split over `ep`.
The local shards are then exactly peft's layout for the rank's E/ep experts, [E/ep*r, in] and [out, r*E/ep],
which is what the fused experts compute with (moe.lora) and what full_tensor() gathers back into peft's layout.

Gradients. FSDP2 was applied before peft added its adapters, so it reduces none of them. An expert adapter's
local gradient already sums the tokens of every rank routed to its experts (they came through the all-to-all);
it is summed over the ranks holding the same experts (HSDP replicas) and divided by the world size. Every other
adapter is a replica on every rank: its gradient is summed over the world and divided by the world size. Both
are tensor hooks, so gradient accumulation over micro-batches stays exact. Initial values are rank 0's.
"""

from __future__ import annotations

import os
from types import MethodType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ..moe.block import MoEBlock
from ..moe.lora import split_param_wrappers
from .setup import DistributedSetup


def _expert_wrappers(model: nn.Module) -> list[nn.Module]:
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    return [w for b in blocks for w in split_param_wrappers(getattr(b, b.spec.experts_attr))[1].values()]


def _shard(linear: nn.Linear, mesh: DeviceMesh, rank_dim: int, split_factor: int) -> nn.Parameter:
    """linear.weight [.., rows, ..] -> a DTensor holding this ep rank's experts' part of dim `rank_dim`, whose
    `split_factor` blocks of E each hold one slice per expert."""
    weight = linear.weight
    ep, index = mesh.size(), mesh.get_local_rank()
    blocks = weight.detach().unflatten(rank_dim, (split_factor, -1))
    per_rank = blocks.shape[rank_dim + 1] // ep
    local = blocks.narrow(rank_dim + 1, index * per_rank, per_rank).flatten(rank_dim, rank_dim + 1).contiguous()
    placement = Shard(rank_dim) if split_factor == 1 else _StridedShard(rank_dim, split_factor=split_factor)
    dtensor = DTensor.from_local(local, mesh, [placement], run_check=False, shape=weight.shape, stride=weight.stride())
    linear.weight = nn.Parameter(dtensor, requires_grad=weight.requires_grad)
    return linear.weight


def _resize_fsdp_adapters(model: nn.Module) -> None:
    """peft sizes the adapters of a Linear whose weight is a DTensor from its local shard unless the mesh is named
    "fsdp" (it takes any other mesh for tensor parallelism); FSDP2 here shards on "dp_shard", and the module computes
    the whole projection. Such adapters are rebuilt by peft at the Linear's own size, in the dtype peft gave them."""
    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        base = module.get_base_layer() if isinstance(module, Linear) else None
        if base is None or (module.in_features, module.out_features) == (base.in_features, base.out_features):
            continue
        module.in_features, module.out_features = base.in_features, base.out_features
        for adapter in list(module.lora_A):
            dtype = module.lora_A[adapter].weight.dtype
            config = model.peft_config[adapter]
            module.update_layer(adapter, module.r[adapter], module.lora_alpha[adapter], config=config)
            module.lora_A[adapter].to(dtype)
            module.lora_B[adapter].to(dtype)


def _group(mesh: DeviceMesh) -> dist.ProcessGroup:
    return mesh.get_group() if mesh.ndim == 1 else mesh._flatten().get_group()


def _mean_gradient(param: nn.Parameter, group: dist.ProcessGroup | None, world: int) -> None:
    """The gradient reaching `param` is summed over `group` (None: no other rank holds this tensor) and divided by
    the world size."""

    def reduce(grad: torch.Tensor) -> torch.Tensor:
        local = (grad.to_local() if isinstance(grad, DTensor) else grad).clone()
        if group is not None:
            dist.all_reduce(local, group=group)
        local.div_(world)
        if isinstance(grad, DTensor):
            return DTensor.from_local(local, grad.device_mesh, grad.placements, run_check=False, shape=grad.shape,
                                      stride=grad.stride())
        return local

    param.register_hook(reduce)


def _gathering_save(model: nn.Module) -> None:
    """model.save_pretrained becomes collective: the sharded adapters are gathered, rank 0 writes peft's file."""
    peft_save = model.save_pretrained

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        state = {name: tensor.full_tensor() if isinstance(tensor, DTensor) and "lora_" in name else tensor
                 for name, tensor in self.state_dict().items()}
        kwargs.setdefault("is_main_process", dist.get_rank() == 0)
        peft_save(save_directory, state_dict=state, **kwargs)
        dist.barrier()

    model.save_pretrained = MethodType(save_pretrained, model)


def distribute_adapters(model: nn.Module, setup: DistributedSetup) -> nn.Module:
    """In place on a peft model of an automoe model loaded with `setup` (see the module docstring); returns it.
    Call it once, after get_peft_model and before building the optimizer."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable or any(isinstance(p, DTensor) for p in trainable):
        raise ValueError("distribute_adapters wants a peft model straight from get_peft_model: its trainable tensors "
                         "are the adapters, none of them sharded yet (call it once).")
    _resize_fsdp_adapters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:  # every rank starts from rank 0's adapters
        dist.broadcast(param.data, src=0)
    world = setup.world_size
    expert_group = _group(setup.expert_dp_mesh) if setup.expert_dp_mesh.size() > 1 else None
    expert_params = set()
    for wrapper in _expert_wrappers(model):
        for adapter in wrapper.lora_A:
            expert_params.add(_shard(wrapper.lora_A[adapter], setup.ep_mesh, 0, 1))
            expert_params.add(_shard(wrapper.lora_B[adapter], setup.ep_mesh, 1, wrapper.r[adapter]))
    for param in model.parameters():
        if param.requires_grad:
            _mean_gradient(param, expert_group if param in expert_params else dist.group.WORLD, world)
    _gathering_save(model)
    return model
