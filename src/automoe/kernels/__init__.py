"""Fused kernels, each beside its plain-torch reference; select.py is the one place that picks the path."""

from ..options import KERNEL_MODES
from .optim import AdamW
from .patch import apply_kernels

__all__ = ["AdamW", "KERNEL_MODES", "apply_kernels"]
