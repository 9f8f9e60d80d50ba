"""The all-to-all of expert parallelism as a torch.library custom op, with autograd.

As an op (not a Python call inside a Function) it is visible to selective activation checkpointing: the
checkpoint policy (distributed.parallelize) saves its outputs, so recomputing a checkpointed layer reuses the
tokens it received instead of running the collective again (which would also have to be matched on every other
rank). The backward sends gradients back along the same routes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_GROUPS: dict[str, dist.ProcessGroup] = {}


def register_group(group: dist.ProcessGroup) -> str:
    """The name under which all_to_all finds `group` (an op takes no ProcessGroup argument)."""
    _GROUPS[group.group_name] = group
    return group.group_name


@torch.library.custom_op("automoe::all_to_all", mutates_args=())
def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group_name: str) -> torch.Tensor:
    """Rows in_splits[j] of x go to rank j; rows out_splits[j] of the result come from rank j."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=_GROUPS[group_name])
    return out


@all_to_all.register_fake
def _(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group_name: str) -> torch.Tensor:
    return x.new_empty((sum(out_splits), *x.shape[1:]))


def _setup_context(ctx, inputs, output) -> None:
    _, ctx.out_splits, ctx.in_splits, ctx.group_name = inputs


def _backward(ctx, grad: torch.Tensor):
    return all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group_name), None, None, None


all_to_all.register_autograd(_backward, setup_context=_setup_context)

ALL_TO_ALL_OPS = frozenset({torch.ops.automoe.all_to_all.default})
