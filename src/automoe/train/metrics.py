"""What a run reports: a progress bar, metrics.jsonl (and TensorBoard when installed), a loss-curve PNG."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RecipeError

# datasheet dense bf16 tensor-core peaks (FLOP/s) of GPUs worth naming; fp32 runs use the TF32 figure
PEAK_FLOPS = {"H200": (989e12, 495e12), "H100": (989e12, 495e12), "A100": (312e12, 156e12)}


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAK_FLOPS.items():
        if key in name:
            return bf16 if dtype == torch.bfloat16 else tf32
    return None


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """The model FLOPs per trained token of shared/BENCHMARKS.md (6 x active matmul parameters + attention),
    counted the one way `automoe bench` counts them."""
    from automoe.bench.workload import flops_per_token as bench_flops

    return bench_flops(model.config, seq_len)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsSink:
    """Rank 0 writes; other ranks hold a sink that does nothing."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            # drop what the interrupted run logged after the checkpoint we resume from
            kept = [line for line, record in self._read() if record.get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def _read(self) -> list[tuple[str, dict[str, Any]]]:
        """(line, record) pairs; a torn last line (a kill mid-write) is dropped, a bad line elsewhere is an error."""
        lines = self.path.read_text().splitlines()
        out = []
        for i, line in enumerate(lines):
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:
                    continue
                raise RecipeError(f"{self.path}: line {i + 1} is not JSON ({e.msg}); fix or delete that line") from e
        return out

    def log(self, record: dict[str, Any]) -> None:
        """One strict-JSON line: a NaN or infinite number is written as null."""
        if not self.enabled:
            return
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [record for _, record in self._read()]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="finetune", unit="step",
                dynamic_ncols=True, mininterval=1.0, file=sys.stderr)


def plot_losses(records: list[dict[str, Any]], path: Path) -> Path | None:
    """train and validation loss against step; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
