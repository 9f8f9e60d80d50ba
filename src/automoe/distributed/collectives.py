"""The all-to-all of expert parallelism as a torch.library op, with autograd.

`all_to_all` sends the rows of one or more tensors with the same row count and any dtypes in one collective (their
rows packed side by side as bytes when there are several), so a token's hidden state, expert slots and routing
weights travel in one call: a collective costs the host far more to issue than the copies that pack it.

As an op (not a Python call hidden in a Function) it is visible to selective activation checkpointing: the
checkpoint policy (distributed.parallelize) saves its outputs, so recomputing a checkpointed layer reuses the
tokens it received instead of running the collective again (which would also have to be matched on every other
rank); torch.compile traces it through its fake implementation. The op is defined with torch.library.Library and
its autograd is a thin Function around it, not torch.library.custom_op: custom_op's autograd wrapper costs about
four times the host time per call, and a layer makes five of these calls on a host-bound path. The backward sends
the gradients back along the same routes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

_GROUPS: dict[str, dist.ProcessGroup] = {}

_LIB = torch.library.Library("automoe", "FRAGMENT")
_LIB.define("all_to_all(Tensor[] tensors, int[] out_splits, int[] in_splits, str group_name) -> Tensor[]")


def register_group(group: dist.ProcessGroup) -> str:
    """The name under which all_to_all finds `group` (an op takes no ProcessGroup argument)."""
    _GROUPS[group.group_name] = group
    return group.group_name


def _row_numel(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:])


def _as_bytes(tensors: list[torch.Tensor], rows: int) -> torch.Tensor:
    """[rows, bytes of a row of every tensor]: the first `rows` rows of each tensor, side by side."""
    return torch.cat([t[:rows].reshape(rows, _row_numel(t)).contiguous().view(torch.uint8) for t in tensors], dim=1)


def _from_bytes(packed: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of _as_bytes for tensors shaped and typed like `like` (row count from `packed`)."""
    if packed.shape[0] == 0:  # an empty slice keeps its byte offset, which view(dtype) refuses
        return [t.new_empty((0, *t.shape[1:])) for t in like]
    out, start = [], 0
    for t in like:
        width = _row_numel(t) * t.element_size()
        piece = packed[:, start : start + width].contiguous().view(t.dtype)
        out.append(piece.view(packed.shape[0], *t.shape[1:]))
        start += width
    return out


def _all_to_all(tensors: list[torch.Tensor], out_splits: list[int], in_splits: list[int], group_name: str
                ) -> list[torch.Tensor]:
    rows, single = sum(in_splits), len(tensors) == 1  # one tensor travels as it is, several packed as bytes
    sent = tensors[0][:rows].contiguous() if single else _as_bytes(tensors, rows)
    received = sent.new_empty((sum(out_splits), *sent.shape[1:]))
    dist.all_to_all_single(received, sent, out_splits, in_splits, group=_GROUPS[group_name])
    return [received] if single else _from_bytes(received, tensors)


def _fake(tensors: list[torch.Tensor], out_splits: list[int], in_splits: list[int], group_name: str
          ) -> list[torch.Tensor]:
    return [t.new_empty((sum(out_splits), *t.shape[1:])) for t in tensors]


_LIB.impl("all_to_all", _all_to_all, "CompositeExplicitAutograd")
torch.library.register_fake("automoe::all_to_all", _fake, lib=_LIB)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_splits: list[int], in_splits: list[int], group_name: str, *tensors: torch.Tensor):
        ctx.routes = (out_splits, in_splits, group_name)
        ctx.inputs = [(t.shape, t.dtype, t.device) for t in tensors]
        outs = torch.ops.automoe.all_to_all.default(list(tensors), out_splits, in_splits, group_name)
        ctx.mark_non_differentiable(*(o for o in outs if not o.dtype.is_floating_point))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        """The floating outputs' gradients go back in one collective; input rows that were not sent (beyond
        sum(in_splits)) get zero gradient, integer inputs none."""
        out_splits, in_splits, group_name = ctx.routes
        wanted = [dtype.is_floating_point for _, dtype, _ in ctx.inputs]
        sent = [g if g is not None else torch.zeros(sum(out_splits), *shape[1:], dtype=dtype, device=device)
                for g, (shape, dtype, device), w in zip(grads, ctx.inputs, wanted, strict=True) if w]
        back = iter(torch.ops.automoe.all_to_all.default(sent, in_splits, out_splits, group_name) if sent else [])
        out = []
        for (shape, _, _), w in zip(ctx.inputs, wanted, strict=True):
            grad = next(back) if w else None
            if grad is not None and grad.shape[0] < shape[0]:
                grad = torch.cat([grad, grad.new_zeros(shape[0] - grad.shape[0], *shape[1:])])
            out.append(grad)
        return None, None, None, *out


def all_to_all(tensors: list[torch.Tensor], out_splits: list[int], in_splits: list[int], group_name: str
               ) -> list[torch.Tensor]:
    """The first sum(in_splits) rows of each tensor: rows in_splits[j] go to rank j; rows out_splits[j] of each
    result come from rank j. Differentiable in its floating tensors."""
    return list(_AllToAll.apply(out_splits, in_splits, group_name, *tensors))


ALL_TO_ALL_OPS = frozenset({torch.ops.automoe.all_to_all.default})
