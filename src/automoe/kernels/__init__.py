"""Fused kernels, each beside its plain-torch reference; select.py is the one place that picks the path."""

from .optim import AdamW
from .patch import apply_kernels
from .select import KERNEL_MODES

__all__ = ["AdamW", "KERNEL_MODES", "apply_kernels"]
