"""Exact-match accuracy of greedy generation on held-out prompts: the metric that shows learning.

A plain greedy loop (no KV cache, a fixed number of new tokens) rather than `generate()`: every rank runs
the same forwards, which expert parallelism and FSDP need, and tiny prompts make recomputation cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .runtime import Runtime, all_sum


@dataclass
class EvalPair:
    prompt: str  # the exact text generation starts from (template applied)
    answer: str


def eval_pairs(rows: list[Any], encoder: Any, limit: int) -> list[EvalPair]:
    """Prompt/completion rows, or chats whose last message is the assistant's, up to `limit`."""
    pairs = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        msgs = row.get(encoder.cfg.messages_field)
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            pairs.append(EvalPair(encoder.render(msgs[:-1], add_generation_prompt=True), msgs[-1]["content"]))
        else:
            prompt, answer = row.get(encoder.cfg.prompt_field), row.get(encoder.cfg.completion_field)
            if isinstance(prompt, str) and isinstance(answer, str):
                pairs.append(EvalPair(encoder.prompt_text(prompt), answer))
        if len(pairs) >= limit:
            break
    return pairs


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                    device: torch.device) -> list[str]:
    """Left-padded batch, argmax for max_new_tokens steps; the text up to the first EOS."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts] or [[tokenizer.pad_token_id]]
    width = max(len(x) for x in ids)
    tokens = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    for _ in range(max_new_tokens):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    out = []
    for row in tokens[: len(prompts), width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def exact_match(model: nn.Module, tokenizer: Any, pairs: list[EvalPair], max_new_tokens: int, batch_size: int,
                rt: Runtime) -> tuple[float, list[tuple[str, str, str]]]:
    """(accuracy over all ranks, a few (prompt, expected, got) examples from this rank)."""
    was_training = model.training
    model.eval()
    per_rank = -(-len(pairs) // rt.dp_size)
    mine = pairs[rt.dp_rank * per_rank : (rt.dp_rank + 1) * per_rank]
    hits, examples = 0, []
    for start in range(0, per_rank, batch_size):  # same number of batches on every rank
        chunk = mine[start : start + batch_size]
        got = greedy_generate(model, tokenizer, [p.prompt for p in chunk], max_new_tokens, rt.device)
        for pair, answer in zip(chunk, got, strict=True):
            hits += answer.strip() == pair.answer.strip()
            examples.append((pair.prompt, pair.answer, answer))
    model.train(was_training)
    total_hits, total = all_sum([float(hits), float(len(mine))], rt)
    return total_hits / max(total, 1.0), examples
