"""The all-to-alls of expert parallelism as torch.library custom ops, with autograd.

`all_to_all` sends the rows of one tensor; `all_to_all_rows` the rows of several tensors with the same row count
and any dtypes in one collective (their rows packed side by side as bytes), so a token's hidden state, expert ids
and routing weights travel in one call: a collective costs the host far more to issue than the copies that pack
it. As ops (not a Python call inside a Function) it is visible to selective activation checkpointing: the
checkpoint policy (distributed.parallelize) saves its outputs, so recomputing a checkpointed layer reuses the
tokens it received instead of running the collective again (which would also have to be matched on every other
rank). The backward sends gradients back along the same routes.
"""

from __future__ import annotations

import math

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


def _as_bytes(tensors: list[torch.Tensor], rows: int) -> torch.Tensor:
    """[rows, bytes of a row of every tensor]: the first `rows` rows of each tensor, side by side."""
    return torch.cat([t[:rows].reshape(rows, _row_numel(t)).contiguous().view(torch.uint8) for t in tensors], dim=1)


def _row_numel(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:])


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


@torch.library.custom_op("automoe::all_to_all_rows", mutates_args=())
def all_to_all_rows(
    tensors: list[torch.Tensor], out_splits: list[int], in_splits: list[int], group_name: str
) -> list[torch.Tensor]:
    """all_to_all of each tensor's first sum(in_splits) rows (same splits for all), in one collective."""
    packed = _as_bytes(tensors, sum(in_splits))
    received = packed.new_empty((sum(out_splits), packed.shape[1]))
    dist.all_to_all_single(received, packed, out_splits, in_splits, group=_GROUPS[group_name])
    return _from_bytes(received, tensors)


@all_to_all_rows.register_fake
def _(tensors: list[torch.Tensor], out_splits: list[int], in_splits: list[int], group_name: str
      ) -> list[torch.Tensor]:
    return [t.new_empty((sum(out_splits), *t.shape[1:])) for t in tensors]


def _rows_setup_context(ctx, inputs, output) -> None:
    tensors, ctx.out_splits, ctx.in_splits, ctx.group_name = inputs
    ctx.shapes = [(t.shape, t.dtype, t.device) for t in tensors]
    ctx.differentiable = [t.dtype.is_floating_point for t in tensors]


def _rows_backward(ctx, grads: list[torch.Tensor | None]):
    """The gradients of the floating outputs go back in one collective; the input rows that were not sent (beyond
    sum(in_splits)) get zero gradient, integer inputs none."""
    sent = [g if g is not None else torch.zeros(sum(ctx.out_splits), *shape[1:], dtype=dtype, device=device)
            for g, (shape, dtype, device), wanted in zip(grads, ctx.shapes, ctx.differentiable, strict=True)
            if wanted]
    back = iter(all_to_all_rows(sent, ctx.in_splits, ctx.out_splits, ctx.group_name) if sent else [])
    out = []
    for (shape, dtype, device), wanted in zip(ctx.shapes, ctx.differentiable, strict=True):
        if not wanted:
            out.append(None)
            continue
        grad = next(back)
        if grad.shape[0] < shape[0]:
            grad = torch.cat([grad, grad.new_zeros(shape[0] - grad.shape[0], *shape[1:])])
        out.append(grad)
    return out, None, None, None


all_to_all_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)

ALL_TO_ALL_OPS = frozenset({torch.ops.automoe.all_to_all.default, torch.ops.automoe.all_to_all_rows.default})
