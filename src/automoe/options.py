"""The one keyword (`automoe_options=`) that steers what automoe changes in a model."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

EXPERTS_BACKENDS = ("grouped_mm", "per_expert")
ROUTER_MODES = ("model", "balanced")
KERNEL_MODES = ("auto", "triton", "torch", "off")


@dataclass(frozen=True)
class AutoMoEOptions:
    """What automoe does to a model it loads.

    enabled: replace the MoE blocks (False loads the plain HF model).
    experts_backend: "grouped_mm" (one grouped GEMM per projection) or "per_expert" (a plain loop over
        experts; the reference path, slow).
    router: "model" (the family's own router) or "balanced" (token i goes to experts (i*k + j) % E;
        for benchmarks only, it changes what the model computes).
    kernels: "auto" (fused Triton kernels on CUDA tensors, their torch references elsewhere), "triton" (Triton
        or an error), "torch" (the references everywhere) or "off" (only the MoE blocks are swapped).
        See automoe.kernels.
    fused_loss: compute the training loss from hidden states in chunks, never making the [tokens, vocab]
        logits; with labels in training mode the output's logits are then None. Off by default because
        callers may read the logits.
    """

    enabled: bool = True
    experts_backend: str = "grouped_mm"
    router: str = "model"
    kernels: str = "auto"
    fused_loss: bool = False

    def __post_init__(self) -> None:
        if self.experts_backend not in EXPERTS_BACKENDS:
            raise ValueError(
                f"automoe_options: unknown experts_backend {self.experts_backend!r}; "
                f"choose one of {', '.join(EXPERTS_BACKENDS)}."
            )
        if self.router not in ROUTER_MODES:
            raise ValueError(
                f"automoe_options: unknown router {self.router!r}; choose one of {', '.join(ROUTER_MODES)}."
            )
        if self.kernels not in KERNEL_MODES:
            raise ValueError(
                f"automoe_options: unknown kernels {self.kernels!r}; choose one of {', '.join(KERNEL_MODES)}."
            )

    @classmethod
    def coerce(cls, value: AutoMoEOptions | dict[str, Any] | bool | None) -> AutoMoEOptions:
        """Accept the forms a user is likely to pass: None, a bool, a dict or an instance."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(
                    f"automoe_options: unknown key(s) {unknown}; known keys are {sorted(known)}."
                )
            return cls(**value)
        raise TypeError(
            f"automoe_options must be an AutoMoEOptions, a dict, a bool or None, not {type(value).__name__}."
        )
