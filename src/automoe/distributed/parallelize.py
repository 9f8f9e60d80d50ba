"""Apply expert parallelism, activation checkpointing and FSDP2 to a built model (model code stays single-device).

Order: decoder layers get checkpointing, experts become DTensors Shard(0) over `ep` (and their block gets the
all-to-all dispatcher), then fully_shard on each experts module (over the ranks sharing an expert shard), on
each decoder layer (the whole data-parallel world) and on the root.

FSDP2 goes only where it has something to do: a group of weights that no other rank shares has nothing to
shard or reduce, and FSDP2 would still copy all of it every step (unshard before forward and backward, reduce
after) and turn the optimizer's tensors into DTensors. So experts whose shard group is one rank stay EP DTensors
outside FSDP2, and at world size 1 nothing is wrapped at all: the model trains as the single-device drop-in
does. A mixed-precision policy (param_dtype / reduce_dtype) always takes FSDP2, which is what applies it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.utils import checkpoint as torch_checkpoint
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers.modeling_layers import GradientCheckpointingLayer

from ..moe.block import MoEBlock
from .collectives import ALL_TO_ALL_OPS
from .dispatch import AllToAllDispatcher
from .setup import DistributedSetup

_aten = torch.ops.aten
_ROUTING_OPS = frozenset({_aten.topk.default})
_ATTENTION_OPS = frozenset(
    getattr(_aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(_aten, name)
)


# FSDP2's hooks of the experts module run inside the checkpointed layer and open a different number of profiler
# ranges in the forward and in the recomputation; selective checkpointing must not count those as ops to match.
_PROFILER_OPS = ("_record_function_enter_new", "_record_function_exit")
getattr(torch_checkpoint, "SAC_IGNORED_OPS", set()).update(
    getattr(packet, name)
    for packet in (getattr(torch.ops.profiler, op, None) for op in _PROFILER_OPS)
    if packet is not None
    for name in packet.overloads()
)


def shard_experts(experts: nn.Module, setup: DistributedSetup) -> None:
    """Replace each expert tensor [E, ...] by a DTensor Shard(0) over `ep` holding this rank's E/ep experts."""
    ep_mesh = setup.ep_mesh
    rank = ep_mesh.get_local_rank()
    for name in experts.spec.tensor_names:
        param = experts._parameters.get(name)
        if param is None:
            continue
        setup.check_num_experts(param.shape[0])
        per_rank = param.shape[0] // setup.ep_size
        local = param.detach()[rank * per_rank : (rank + 1) * per_rank]
        local = local if local.is_meta else local.clone()
        dtensor = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=param.shape,
                                     stride=param.stride())
        experts._parameters[name] = nn.Parameter(dtensor, requires_grad=param.requires_grad)


def _all_to_all(block: MoEBlock, setup: DistributedSetup) -> AllToAllDispatcher:
    return AllToAllDispatcher(block.spec.experts.num_experts, setup.ep_mesh.get_group(), setup.dispatch_chunks)


def _policy(save: frozenset, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_function(mode: str):
    """The function decoder layers checkpoint with. Both modes keep the router's top-k outputs, so recomputation
    never reroutes (a recomputed routing could change token counts and break the saved graph), and what each
    expert-parallel all-to-all received, so recomputation never runs a collective. "full" recomputes everything
    else; "selective" also keeps the attention kernel's outputs."""
    save = _ROUTING_OPS | ALL_TO_ALL_OPS | (_ATTENTION_OPS if mode == "selective" else frozenset())
    context_fn = partial(create_selective_checkpoint_contexts, partial(_policy, save))
    return partial(checkpoint, use_reentrant=False, context_fn=context_fn)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no transformers decoder layers (GradientCheckpointingLayer)")
    return layers


def parallelize_model(model: nn.Module, setup: DistributedSetup) -> nn.Module:
    """EP + activation checkpointing + FSDP2, in place. Works on meta-device models (then call to_empty)."""
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    if setup.ep_size > 1 and not blocks:
        raise ValueError(
            f"ep_size={setup.ep_size} needs automoe's MoE blocks, and this {type(model).__name__} has none "
            "(automoe_options={'enabled': False}, or a family automoe does not recognise); use ep_size 1."
        )
    for block in blocks:
        setup.check_num_experts(block.spec.experts.num_experts)
    layers = decoder_layers(model)
    if setup.activation_checkpointing != "off":
        function = checkpoint_function(setup.activation_checkpointing)
        for layer in layers:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = function
    mixed_precision = setup.param_dtype is not None or setup.reduce_dtype is not None
    if setup.world_size == 1 and not mixed_precision:
        if setup.dispatcher == "all_to_all":  # a loopback: every dispatch and combine runs the EP code
            for block in blocks:
                block.dispatcher = _all_to_all(block, setup)
        return model
    mp = MixedPrecisionPolicy(param_dtype=setup.param_dtype, reduce_dtype=setup.reduce_dtype)
    ignored: set[nn.Parameter] = set()
    for block in blocks:
        experts = getattr(block, block.spec.experts_attr)
        shard_experts(experts, setup)
        if setup.dispatcher == "all_to_all":
            block.dispatcher = _all_to_all(block, setup)
        # An expert's gradient sums the contributions of the tokens of every rank of its ep group (they came
        # through the all-to-all); dividing by the whole world size makes it the gradient of the mean loss.
        if setup.expert_dp_mesh.size() == 1 and not mixed_precision:
            # No other rank holds these experts (see the module docstring): their gradient is scaled here instead.
            experts.grad_scale = 1.0 / setup.world_size
            ignored.update(experts.parameters())
            continue
        fully_shard(experts, mesh=setup.expert_dp_mesh, reshard_after_forward=setup.reshard_after_forward,
                    mp_policy=mp)
        if setup.ep_size > 1:
            experts.set_gradient_divide_factor(float(setup.world_size))
            if setup.device.type == "cpu" and setup.ep_shard_size > 1:
                # gloo has no PREMUL_SUM: reduce with SUM, then divide (FSDP2 skips the collective, and divides
                # by the factor itself, when the shard group is a single rank)
                experts.set_force_sum_reduction_for_comms(True)
    for layer in layers:
        fully_shard(layer, mesh=setup.dp_mesh, reshard_after_forward=setup.reshard_after_forward, mp_policy=mp,
                    ignored_params=ignored)
    fully_shard(model, mesh=setup.dp_mesh, reshard_after_forward=False, mp_policy=mp, ignored_params=ignored)
    return model
