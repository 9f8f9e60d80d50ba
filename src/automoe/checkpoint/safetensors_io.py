"""Read tensors, or row ranges of them, from safetensors files with plain file reads.

A row range of a row-major tensor is one contiguous byte range, so a rank that owns rows [a, b) of a weight
reads exactly those bytes: no mmap of whole files, and every byte read goes through `SafetensorsFile.read`,
where it is counted.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in its file."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's first element

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsFile:
    """Byte-exact reads from one checkpoint directory (one file, or shards with an index)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.entries: dict[str, Entry] = {}
        self.bytes_read = 0
        for name in self._files(directory):
            self._read_header(os.path.join(directory, name))

    @staticmethod
    def _files(directory: str) -> list[str]:
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                return sorted(set(json.load(f)["weight_map"].values()))
        if os.path.exists(os.path.join(directory, "model.safetensors")):
            return ["model.safetensors"]
        raise FileNotFoundError(
            f"{directory} holds no model.safetensors nor model.safetensors.index.json; the sharded loader reads "
            "safetensors checkpoints only (re-save .bin checkpoints with save_pretrained)."
        )

    def _read_header(self, path: str) -> None:
        """Every rank reads every header, so a damaged or truncated file is an error on all ranks alike."""
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if 8 + length > size:
                    raise ValueError(f"its header claims {length} bytes but the file has {size}")
                header = json.loads(f.read(length))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}): a damaged or partial copy?") from e
        header.pop("__metadata__", None)
        for key, meta in header.items():
            if meta["dtype"] not in DTYPES:
                raise ValueError(f"{path}: tensor {key} has dtype {meta['dtype']}, which the sharded loader can't read")
            begin, end = meta["data_offsets"]
            if 8 + length + end > size:
                raise ValueError(f"{path} is truncated: tensor {key} ends at byte {8 + length + end} but the file has "
                                 f"{size} bytes (an interrupted copy or download?)")
            self.entries[key] = Entry(path, DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + length + begin)

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `key` (CPU, stored dtype), or only its rows [start, end) along dim 0."""
        entry = self.entries[key]
        if rows is None or not entry.shape:
            start, end = 0, (entry.shape[0] if entry.shape else 1)
            shape = entry.shape
        else:
            start, end = rows
            shape = (end - start, *entry.shape[1:])
        row_bytes = entry.row_bytes if entry.shape else torch.empty((), dtype=entry.dtype).element_size()
        buffer = bytearray((end - start) * row_bytes)
        if buffer:
            with open(entry.file, "rb") as f:
                f.seek(entry.offset + start * row_bytes)
                got = f.readinto(buffer)
            if got != len(buffer):  # the file shrank after its header was read
                raise ValueError(f"{entry.file}: short read of tensor {key}: {got} of {len(buffer)} bytes")
        self.bytes_read += len(buffer)
        if not buffer:
            return torch.empty(shape, dtype=entry.dtype)
        return torch.frombuffer(buffer, dtype=entry.dtype).view(shape)
