"""Which checkpoint tensors fill which model tensor, for a sharded load that reads only slices.

transformers v5 turns per-expert checkpoint keys (`mlp.experts.3.gate_proj.weight`, ...) into fused model
tensors (`mlp.experts.gate_up_proj [E, 2I, H]`) with the family's conversion mapping. Its loader reads every
source tensor and stacks them; here the same mapping (and HF's own renaming function) is read as a plan:
"expert e, part p of n along dim 1 of the fused tensor comes from checkpoint key K", so each rank reads only
the experts it owns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    rename_source_key,
)


@dataclass(frozen=True)
class Source:
    """Checkpoint key `key` provides, of model tensor `target`, either the whole tensor (expert None) or
    expert `expert`'s slice number `part` of `parts` along the fused tensor's dim 1."""

    key: str
    target: str
    expert: int | None = None
    part: int = 0
    parts: int = 1


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))


def _parts(converter: WeightConverter, pattern: str) -> tuple[int, int]:
    """(part, parts) for a converter that stacks experts and possibly concatenates projections on dim 1."""
    ops = list(getattr(converter, "operations", []))
    kinds = [type(op) for op in ops]
    if kinds == [MergeModulelist] and ops[0].dim == 0 and len(converter.source_patterns) == 1:
        return 0, 1
    if kinds == [MergeModulelist, Concatenate] and ops[0].dim == 0 and ops[1].dim == 1:
        return converter.source_patterns.index(pattern), len(converter.source_patterns)
    raise NotImplementedError(
        f"the sharded loader does not know the checkpoint conversion {converter} ({[type(o).__name__ for o in ops]}); "
        "load without distributed_setup, save_pretrained, and load that checkpoint instead."
    )


def plan_sources(model, checkpoint_keys: list[str], model_keys: set[str]) -> tuple[dict[str, list[Source]], list[str]]:
    """Map every checkpoint key to what it fills: ({model key: [Source, ...]}, unexpected checkpoint keys)."""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None)
    meta = dict.fromkeys(model_keys, True)
    plan: dict[str, list[Source]] = {}
    unexpected = []
    for key in checkpoint_keys:
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if target not in model_keys:
            unexpected.append(key)
            continue
        if pattern is None:
            plan.setdefault(target, []).append(Source(key, target))
            continue
        renamed, _ = rename_source_key(key, renamings, [], None, None)
        found = _pattern_regex(pattern).search(renamed)
        if found is None or not found.groups():
            raise NotImplementedError(f"cannot tell which expert checkpoint key {key} holds (pattern {pattern})")
        part, parts = _parts(by_pattern[pattern], pattern)
        plan.setdefault(target, []).append(Source(key, target, int(found.group(1)), part, parts))
    return plan, unexpected
