"""Model families. Most are recognised by the structure of their HF MoE block alone
(`automoe.families.recognize`); a family gets a file here only for what structure cannot show."""

from __future__ import annotations

from . import gpt_oss

# Families whose MoE block is checked against HF by name in the test suite; other families whose block
# matches a recognised pattern are accelerated too, after a numerical check against their HF block.
NAMED_FAMILIES = frozenset({"qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"})

BLOCK_OVERRIDES: dict[str, dict] = {"gpt_oss": gpt_oss.BLOCK_OVERRIDES}
