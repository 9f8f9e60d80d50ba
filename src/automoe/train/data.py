"""Training data: read rows, check them (bad rows reported by line), tokenize with loss masks, pack.

A sample is token ids plus next-token labels, -100 wherever the loss must not look (prompt, template
scaffolding, padding). Packing puts several samples in one row; position ids restart at 0 for each, and
transformers turns restarting position ids (with no attention mask) into a per-document causal mask.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .config import DataConfig, RecipeError

IGNORE = -100
BUNDLED = "automoe:"


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # labels[t] is the target for position t (token t+1), or IGNORE


@dataclass
class BadRow:
    where: str  # "line 7" or "row 7"
    reason: str


def resolve_path(spec: str, key: str) -> Path:
    """A local file, or `automoe:NAME` for a dataset bundled with the package."""
    if spec.startswith(BUNDLED):
        path = Path(str(resources.files("automoe") / "data" / spec[len(BUNDLED):]))
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise RecipeError(f"{key}: data file not found: {spec}")
    return path


def read_rows(path: Path, key: str) -> list[tuple[str, Any]]:
    """(where, row) pairs. JSONL is read here so that errors carry line numbers; JSON arrays are read with
    json; parquet/CSV/arrow go through the `datasets` library when it is installed."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        raw = path.read_bytes()
        if suffix == ".json" and raw.lstrip().startswith(b"["):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecipeError(f"{key}: {path} is not UTF-8 text (at byte {e.start})") from e
            try:
                return [(f"row {i + 1}", row) for i, row in enumerate(json.loads(text))]
            except json.JSONDecodeError as e:
                raise RecipeError(f"{key}: {path} is not valid JSON: {e}") from e
        rows = []
        for lineno, raw_line in enumerate(raw.splitlines(), start=1):
            where = f"line {lineno}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append((where, BadRow(where, f"not UTF-8 text (byte {raw_line[e.start:e.start + 1]!r} at column "
                                                  f"{e.start + 1})")))
                continue
            if not line.strip():
                continue
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((where, BadRow(where, f"not valid JSON ({e.msg})")))
        return rows
    builders = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
    if suffix not in builders:
        raise RecipeError(f"{key}: unsupported data file type {suffix!r} ({path}); use .jsonl, .json or .parquet")
    try:
        import datasets
    except ImportError as e:
        raise RecipeError(f"{key}: reading {suffix} files needs the datasets package: pip install datasets") from e
    table = datasets.load_dataset(builders[suffix], data_files=str(path), split="train")
    return [(f"row {i + 1}", row) for i, row in enumerate(table)]


class Encoder:
    """Turns one row into a Sample, or raises ValueError with the reason the row is bad."""

    def __init__(self, tokenizer: Any, cfg: DataConfig) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
            raise RecipeError(
                "data.chat_template: the tokenizer has no chat template; set data.chat_template false "
                "(prompt/completion rows only) or use a tokenizer that has one"
            )

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def prompt_text(self, prompt: str) -> str:
        """What generation starts from: the templated user turn, or BOS + the raw prompt."""
        if self.cfg.chat_template:
            return self.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return (self.tok.bos_token or "") + prompt

    def segments(self, row: Any) -> list[tuple[str, bool]]:
        """(text, trained) pieces whose concatenation is the full rendered sample."""
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        fmt = self.cfg.format
        if fmt == "auto":
            fmt = "messages" if self.cfg.messages_field in row else "prompt_completion"
        if fmt == "messages":
            return self._message_segments(row)
        pf, cf = self.cfg.prompt_field, self.cfg.completion_field
        for name in (pf, cf):
            if name not in row:
                raise ValueError(f"missing field {name!r}")
            if not isinstance(row[name], str):
                raise ValueError(f"field {name!r} must be a string, got {type(row[name]).__name__}")
        if not row[cf].strip():
            raise ValueError(f"empty completion ({cf!r})")
        if self.cfg.chat_template:
            prompt = self.prompt_text(row[pf])
            full = self.render([{"role": "user", "content": row[pf]}, {"role": "assistant", "content": row[cf]}])
            if not full.startswith(prompt):
                raise RecipeError("data.chat_template: the template's user turn is not a prefix of user+assistant")
            return [(prompt, False), (full[len(prompt):], True)]
        return [(self.prompt_text(row[pf]), False), (row[cf] + (self.tok.eos_token or ""), True)]

    def _message_segments(self, row: dict) -> list[tuple[str, bool]]:
        mf = self.cfg.messages_field
        messages = row.get(mf)
        if messages is None:
            raise ValueError(f"missing field {mf!r}")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"field {mf!r} must be a non-empty list of {{role, content}}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{mf}[{i}] must be an object with string 'role' and 'content'")
        if not self.cfg.chat_template:
            raise RecipeError("data.chat_template: chat messages need a chat template; set data.chat_template true")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise ValueError("empty completion (no non-empty assistant message)")
        pieces, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (prefix.startswith(done) and upto.startswith(prefix)):
                raise RecipeError("data.chat_template: the template does not render conversations prefix by prefix")
            pieces += [(prefix[len(done):], False), (upto[len(prefix):], True)]
            done = upto
        pieces.append((self.render(messages)[len(done):], False))
        return [p for p in pieces if p[0]]

    def encode(self, row: Any) -> Sample:
        ids: list[int] = []
        trained: list[bool] = []
        for text, train in self.segments(row):
            piece = self.ids(text)
            ids += piece
            trained += [train] * len(piece)
        if len(ids) > self.cfg.max_seq_len:
            raise ValueError(f"over-long sample: {len(ids)} tokens > data.max_seq_len {self.cfg.max_seq_len}")
        labels = [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
        return Sample(ids, labels)


SHOWN_PER_REASON = 5


def _report(path: Path, bad: list[BadRow]) -> str:
    """Bad rows grouped by reason, a few line numbers each (a file with the wrong keys is one line, not 400)."""
    by_reason: dict[str, list[str]] = {}
    for b in bad:
        by_reason.setdefault(b.reason, []).append(b.where)
    lines = []
    for reason, where in by_reason.items():
        more = f" and {len(where) - SHOWN_PER_REASON} more" if len(where) > SHOWN_PER_REASON else ""
        lines.append(f"  {path}: {', '.join(where[:SHOWN_PER_REASON])}{more}: {reason}")
    return "\n".join(lines)


def _field_hint(rows: list[tuple[str, Any]], cfg: DataConfig) -> str:
    keys = next((sorted(row) for _, row in rows if isinstance(row, dict)), None)
    if keys is None:
        return ""
    return (f"\nthe rows have the keys {keys}: name yours with data.prompt_field and data.completion_field "
            f"(now {cfg.prompt_field!r}, {cfg.completion_field!r}) or data.messages_field (now {cfg.messages_field!r})")


def load_samples(spec: str, key: str, encoder: Encoder, bad_rows: str, log: Any = print) -> list[Sample]:
    """Encode every row of the file; report bad rows by line number, then skip them or stop (data.bad_rows).
    Rows with characters the tokenizer can only map to its unknown token are kept and reported."""
    path = resolve_path(spec, key)
    samples, bad, unknown = [], [], []
    rows = read_rows(path, key)
    unk = getattr(encoder.tok, "unk_token_id", None)
    for where, row in rows:
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        try:
            samples.append(encoder.encode(row))
        except ValueError as e:
            if isinstance(e, RecipeError):
                raise
            bad.append(BadRow(where, str(e)))
            continue
        if unk is not None and unk in samples[-1].input_ids:
            unknown.append(where)
    if unknown:
        log(f"{key}: {len(unknown)} row(s) hold characters the tokenizer does not know, trained as "
            f"{encoder.tok.unk_token} ({path}: {', '.join(unknown[:SHOWN_PER_REASON])}"
            f"{', ...' if len(unknown) > SHOWN_PER_REASON else ''}); the char tokenizer knows printable ASCII only")
    missing_fields = any(b.reason.startswith("missing field") for b in bad)
    hint = _field_hint(rows, encoder.cfg) if missing_fields else ""
    if not samples:
        raise RecipeError(f"{key}: no usable rows in {path}" + (f":\n{_report(path, bad)}" if bad else "") + hint)
    if bad:
        if bad_rows == "error":
            raise RecipeError(f"{key}: {len(bad)} bad row(s) (data.bad_rows is 'error'):\n{_report(path, bad)}{hint}")
        log(f"{key}: skipped {len(bad)} bad row(s):\n{_report(path, bad)}{hint}")
    return samples


def pack(samples: list[Sample], seq_len: int, packing: bool) -> list[list[Sample]]:
    """Group samples into rows of at most seq_len tokens, in order (first fit on the open row)."""
    rows: list[list[Sample]] = []
    used = seq_len + 1
    for s in samples:
        if not packing or used + len(s.input_ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += len(s.input_ids)
    return rows


def collate(rows: list[list[Sample]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """[B, seq_len] input_ids, labels and position_ids; padding is one more 'document' with no loss."""
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, seq_len), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for s in row:
            k = len(s.input_ids)
            input_ids[b, t : t + k] = torch.tensor(s.input_ids)
            labels[b, t : t + k] = torch.tensor(s.labels)
            position_ids[b, t : t + k] = torch.arange(k)
            t += k
        position_ids[b, t:] = torch.arange(seq_len - t)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


class BatchPlan:
    """Which packed rows every (step, micro-step, data-parallel rank) reads: a pure function of the step,
    so resuming needs only the step number. Rows are reshuffled every epoch from (seed, epoch)."""

    def __init__(self, rows: list[list[Sample]], rows_per_step: int, seed: int, shuffle: bool) -> None:
        if len(rows) < rows_per_step:
            raise RecipeError(
                f"train.batch_size: one optimizer step needs {rows_per_step} rows but the training data packs into "
                f"only {len(rows)}; lower train.batch_size"
            )
        self.rows = rows
        self.rows_per_step = rows_per_step
        self.steps_per_epoch = len(rows) // rows_per_step
        self.seed = seed
        self.shuffle = shuffle
        self._order: tuple[int, list[int]] | None = None

    def total_steps(self, max_steps: int, epochs: int) -> int:
        return max_steps if max_steps > 0 else epochs * self.steps_per_epoch

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def step_rows(self, step: int) -> list[list[Sample]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.rows)))
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(len(self.rows), generator=g).tolist()
            self._order = (epoch, order)
        idx = self._order[1][k * self.rows_per_step : (k + 1) * self.rows_per_step]
        return [self.rows[i] for i in idx]


def micro_batches(rows: list[list[Sample]], batch_size: int, grad_accum: int, dp_rank: int, dp_size: int):
    """This rank's micro-batches of one step: micro-step a, rank r reads block a*dp_size + r."""
    for a in range(grad_accum):
        start = (a * dp_size + dp_rank) * batch_size
        yield rows[start : start + batch_size]


def eval_batches(rows: list[list[Sample]], batch_size: int, dp_rank: int, dp_size: int) -> list[list[list[Sample]]]:
    """Every rank runs the same number of batches (a short rank gets all-padding rows, which carry no loss), so
    the collectives of expert parallelism and FSDP stay in step."""
    per_rank = math.ceil(len(rows) / dp_size)
    mine = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    n = math.ceil(per_rank / batch_size)
    return [mine[i * batch_size : (i + 1) * batch_size] or [[]] for i in range(n)]
