"""Fill a sharded (FSDP2 / EP) model from an HF safetensors checkpoint, reading only this rank's slices."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .mapping import Source, plan_sources
from .safetensors_io import SafetensorsFile


def local_rows(tensor: torch.Tensor, rows_of) -> tuple[torch.Tensor, tuple[int, int]]:
    """(the local tensor to fill, its global row range along dim 0; (0, 1) for a scalar)."""
    if isinstance(tensor, DTensor):
        local = tensor.to_local()
        start, end = rows_of(tensor)
        if local.shape[0] != end - start:
            raise RuntimeError(f"internal: expected {end - start} local rows, found {tuple(local.shape)}")
        return local, (start, end)
    return tensor, (0, tensor.shape[0] if tensor.dim() else 1)


def _fill(local: torch.Tensor, rows: tuple[int, int], shape: tuple[int, ...], sources: list[Source],
          reader: SafetensorsFile) -> None:
    start, end = rows
    if len(sources) == 1 and sources[0].expert is None:
        entry = reader.entries[sources[0].key]
        if tuple(entry.shape) != shape:
            raise ValueError(f"checkpoint tensor {sources[0].key} has shape {entry.shape}; the model expects "
                             f"{shape} for {sources[0].target}")
        local.copy_(reader.read(sources[0].key, rows if local.dim() else None).view(local.shape))
        return
    owned = [s for s in sources if s.expert is not None and start <= s.expert < end]
    for source in owned:
        rows_per_part = local.shape[1] // source.parts
        piece = local[source.expert - start, source.part * rows_per_part : (source.part + 1) * rows_per_part]
        tensor = reader.read(source.key)
        if tuple(tensor.shape) != tuple(piece.shape):
            raise ValueError(f"checkpoint tensor {source.key} has shape {tuple(tensor.shape)}; the model expects "
                             f"{tuple(piece.shape)} (a slice of {source.target})")
        piece.copy_(tensor)
    experts_seen = {s.expert for s in sources}
    missing = [e for e in range(start, end) if e not in experts_seen]
    if missing:
        raise ValueError(f"the checkpoint has no tensors for experts {missing} of {sources[0].target}")


@torch.no_grad()
def load_sharded_checkpoint(model: nn.Module, directory: str, rows_of) -> SafetensorsFile:
    """Copy this rank's part of every parameter and persistent buffer from `directory`.

    rows_of(dtensor) -> (start, end): the global rows along dim 0 this rank holds of a sharded tensor.
    Returns the reader, whose `bytes_read` says how much this rank read.
    """
    reader = SafetensorsFile(directory)
    targets = dict(model.named_parameters())
    names = set(model.state_dict())
    targets.update((n, b) for n, b in model.named_buffers() if n in names)
    plan, unexpected = plan_sources(model, list(reader.entries), set(targets))
    missing = sorted(set(targets) - set(plan))
    if missing:
        raise ValueError(f"{directory} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}")
    if unexpected:
        warnings.warn(f"{directory}: {len(unexpected)} checkpoint tensor(s) unused by the model, e.g. "
                      f"{unexpected[:5]}", stacklevel=3)
    for name, tensor in targets.items():
        local, rows = local_rows(tensor, rows_of)
        _fill(local, rows, tuple(tensor.shape), plan[name], reader)
    return reader
