"""The expert activation functions automoe's kernels compute, by their name in spec.ACT_NAMES.

Recognition names a model's act_fn by probing it against these (families.activation); the fused experts' torch
reference calls them by that name, since a custom op takes no module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import ACT_NAMES

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
}
assert tuple(ACTIVATIONS) == ACT_NAMES
