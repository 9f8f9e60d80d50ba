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


def _fill(local: torch.Tensor, rows: tuple[int, int], sources: list[Source], reader: SafetensorsFile) -> None:
    start, end = rows
    if sources[0].expert is None:
        local.copy_(reader.read(sources[0].key, rows if local.dim() else None).view(local.shape))
        return
    owned = [s for s in sources if s.expert is not None and start <= s.expert < end]
    for source in owned:
        rows_per_part = local.shape[1] // source.parts
        piece = local[source.expert - start, source.part * rows_per_part : (source.part + 1) * rows_per_part]
        piece.copy_(reader.read(source.key))


def _validate(plan: dict[str, list[Source]], targets: dict[str, torch.Tensor], reader: SafetensorsFile,
              directory: str) -> None:
    """Checks that every rank makes alike, before any rank reads (a rank-local error would hang the others)."""
    for name, tensor in targets.items():
        sources = plan[name]
        if len(sources) == 1 and sources[0].expert is None:
            entry_shape = tuple(reader.entries[sources[0].key].shape)
            if entry_shape != tuple(tensor.shape):
                raise ValueError(f"checkpoint tensor {sources[0].key} has shape {entry_shape}; the model expects "
                                 f"{tuple(tensor.shape)} for {name}")
            continue
        if any(s.expert is None for s in sources):
            raise ValueError(f"{directory} holds {name} both fused and per expert: {[s.key for s in sources][:4]}")
        seen = {(s.expert, s.part) for s in sources}
        lacking = [e for e in range(tensor.shape[0]) if any((e, p) not in seen for p in range(sources[0].parts))]
        if lacking:
            raise ValueError(f"{directory} has no tensors for experts {lacking} of {name}")
        piece = (tensor.shape[1] // sources[0].parts, *tensor.shape[2:])
        for source in sources:
            if tuple(reader.entries[source.key].shape) != piece:
                raise ValueError(f"checkpoint tensor {source.key} has shape {reader.entries[source.key].shape}; "
                                 f"the model expects {piece} (a slice of {name} {tuple(tensor.shape)})")


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
    _validate(plan, targets, reader, directory)
    for name, tensor in targets.items():
        local, rows = local_rows(tensor, rows_of)
        _fill(local, rows, plan[name], reader)
    return reader
