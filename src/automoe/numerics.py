"""How automoe compares two tensors: one relative error, used by its tests and benchmarks alike."""

from __future__ import annotations

import torch


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp64 (Frobenius norms; a zero `want` divides by 1e-30, not 0)."""
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
