"""save_pretrained for a sharded (FSDP2 / EP) model: a standard HF checkpoint with per-expert keys.

Tensors are gathered one at a time (every rank takes part in each gather, in the same order) and only rank 0
keeps a CPU copy, one decoder layer's worth at a time, which transformers' own reverse conversion turns into
the per-expert keys on disk. No rank ever holds the whole model, on its GPU or in its memory.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion
from transformers.utils.hub import convert_file_size_to_int

_OUR_FILES = re.compile(r"^model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def _directory_problem(directory: str, overwrite: bool) -> str | None:
    if os.path.isfile(directory):
        return f"save_directory {directory!r} is a file; pass a directory."
    if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
        return (f"save_directory {directory!r} exists and is not empty; pass overwrite=True to replace the checkpoint "
                "in it, or choose a new directory.")
    return None


class _ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` and the index HF expects."""

    def __init__(self, directory: str, max_bytes: int) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous().clone()  # own storage: safetensors refuses shared views
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        save_file(self.pending, self._temp(len(self.shards)), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _temp(self, index: int) -> str:
        return os.path.join(self.directory, f".automoe-shard-{index:05d}.tmp")

    def finish(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self._temp(0), os.path.join(self.directory, "model.safetensors"))
            return
        weight_map = {}
        for index, keys in enumerate(self.shards):
            name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self._temp(index), os.path.join(self.directory, name))
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def _layer_groups(keys: list[str]) -> list[list[str]]:
    groups: list[list[str]] = []
    last = None
    for key in keys:
        match = _LAYER.match(key)
        group = match.group(1) if match else key
        if group != last or not groups:
            groups.append([])
        groups[-1].append(key)
        last = group
    return groups


def hf_class(model: PreTrainedModel) -> type:
    """The transformers class under FSDP2's wrapper class."""
    return next(c for c in type(model).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule))


def save_pretrained_distributed(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    **kwargs: Any,
) -> None:
    """Collective: every rank calls it. Rank 0 writes config, per-expert safetensors shards and their index.

    An existing non-empty `save_directory` is an error unless overwrite=True (then only its model*.safetensors
    files and index are replaced)."""
    unsupported = sorted(k for k, v in kwargs.items() if v and k in ("push_to_hub", "state_dict", "variant"))
    if unsupported or kwargs.get("safe_serialization") is False:
        raise ValueError(f"save_pretrained of a sharded model writes safetensors only; unsupported: "
                         f"{unsupported or ['safe_serialization=False']}.")
    directory = os.fspath(save_directory)
    main = dist.get_rank() == 0
    problem = [_directory_problem(directory, overwrite) if main else None]
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise FileExistsError(problem[0])
    writer = None
    if main:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if _OUR_FILES.match(name):
                os.remove(os.path.join(directory, name))
        writer = _ShardWriter(directory, convert_file_size_to_int(max_shard_size))
    state = model.state_dict()
    # named_parameters lists a tied weight once, under its first name: saved once, as transformers does
    owned = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    keys = [key for key in state if key in owned]
    redistribute_log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute_log.level
    redistribute_log.setLevel(logging.ERROR)  # gathering (_StridedShard, Shard) experts warns on every tensor
    try:
        for group in _layer_groups(keys):
            gathered = {}
            for key in group:
                tensor = state[key]
                full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                if main:
                    gathered[key] = full.detach().to("cpu", copy=True)
                del full
            if main:
                for key, tensor in revert_weight_conversion(model, gathered).items():
                    writer.add(key, tensor)
    finally:
        redistribute_log.setLevel(level)
    if main:
        writer.finish()
        model.config.architectures = [hf_class(model).__name__]
        model.config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(directory)
    dist.barrier()
