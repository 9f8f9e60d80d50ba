"""Attention through the fastest exact SDPA backend: cuDNN first on the GPU, then flash, efficient, math.

HF's own `sdpa` path is reused unchanged (GQA via enable_gqa when there is no mask, repeated K/V with one);
only the backend priority differs. PyTorch's own order depends on its version and the inputs (torch 2.11 on an
H100 already takes cuDNN for unmasked causal GQA, see the v5 column's profile in benchmarks/profiles/; other
versions and inputs take flash, at about half cuDNN's rate there), so the order is pinned here. Where cuDNN
cannot take an input (a document mask for packed sequences on some versions, an unsupported head dim, a CPU
tensor) PyTorch's dispatcher moves down the list: that is the fallback, and it is exact.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "automoe_sdpa"
PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def automoe_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    with sdpa_kernel(PRIORITY, set_priority=True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Add the name to transformers' registries (new entries only; no existing model's path changes). Run on
    import, so the name an automoe model's config carries is known wherever automoe is imported, as by
    torch.load of a pickled model in a process that never built one."""
    AttentionInterface.register(NAME, automoe_sdpa_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


register()


def patch_attention(model: torch.nn.Module) -> bool:
    """Move a model that runs HF's `sdpa` onto automoe_sdpa; any other choice the user made is kept."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
