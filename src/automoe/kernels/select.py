"""The one place that chooses between a kernel's Triton path and its plain-torch reference."""

from __future__ import annotations

import importlib
import os

import torch


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


_TRITON = _imports("triton")  # once, at import: a plain bool that torch.compile reads without tracing a cache


def triton_available() -> bool:
    return _TRITON


def interpreting() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (slowly): how the kernels are tested without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(mode: str, tensor: torch.Tensor) -> bool:
    """True when `mode` asks for (or allows) the Triton path and it can run on `tensor`'s device.

    "auto": Triton for CUDA tensors when triton imports, torch otherwise; "triton": Triton or a clear error;
    "torch": always the reference path.
    """
    if mode in ("torch", "off"):
        return False
    runnable = triton_available() and (tensor.is_cuda or interpreting())
    if mode == "triton" and not runnable:
        raise RuntimeError(
            f"automoe kernels='triton' needs the triton package and a CUDA tensor (got a {tensor.device.type} "
            "tensor); pass automoe_options={'kernels': 'auto'} to fall back to the torch reference."
        )
    return runnable

