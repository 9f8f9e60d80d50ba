"""Which activation function an HF experts module's act_fn computes, found by probing it, not by its name.

transformers builds act_fn from a config string (`hidden_act`, `mlp_hidden_act`, ...) through ACT2FN, whose
classes change between versions; the function they compute does not. So the act_fn runs on a probe that spans
large magnitudes and is compared with each function automoe's kernels implement; only an exact match names it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..moe.activations import ACTIVATIONS as REFERENCES


def identify_activation(act_fn: nn.Module) -> str | None:
    """The name in ACT_NAMES of the function act_fn computes (fp32, to rounding), or None when it is none."""
    probe = torch.linspace(-12.0, 12.0, 2001, device="cpu")  # on CPU also inside a `torch.device("meta")` build
    probe = torch.cat([probe, torch.randn(512, generator=torch.Generator().manual_seed(0), device="cpu")])
    with torch.no_grad():
        try:
            got = act_fn(probe.clone())
        except Exception:  # an act_fn that cannot run on a plain fp32 tensor is not one of these
            return None
        for name, ref in REFERENCES.items():
            if isinstance(got, torch.Tensor) and got.shape == probe.shape and torch.allclose(
                got, ref(probe), rtol=1e-5, atol=1e-6
            ):
                return name
    return None
