"""Data for `automoe finetune`: bad rows reported by line, loss masks, chat templates, packing, file formats."""

from __future__ import annotations

import json

import pytest
import torch

from automoe.train.config import DataConfig, RecipeError
from automoe.train.data import IGNORE, Encoder, collate, load_samples, pack
from automoe.train.tokenizer import build_char_tokenizer

TOK = build_char_tokenizer()


def targets(sample) -> str:
    return TOK.decode([t for t in sample.labels if t != IGNORE])


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


BAD_FILE = [
    {"prompt": "abc", "completion": "cba"},
    {"prompt": "abc"},
    {"prompt": "abc", "completion": "  "},
    {"prompt": "x" * 100, "completion": "y"},
    "{not json",
    {"messages": [{"role": "user", "content": "hi"}]},
    {"prompt": 3, "completion": "x"},
    {"prompt": "de", "completion": "ed"},
]


def test_bad_rows_are_reported_by_line_and_skipped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", BAD_FILE)
    messages = []
    samples = load_samples(path, "data.train", Encoder(TOK, DataConfig(max_seq_len=64)), "skip", messages.append)
    assert [targets(s) for s in samples] == ["cba<eos>", "ed<eos>"]
    (report,) = messages
    assert "skipped 6 bad row(s)" in report
    for expected in ("line 2: missing field 'completion'", "line 3: empty completion", "line 4: over-long sample",
                     "line 5: not valid JSON", "line 6: empty completion", "line 7: field 'prompt' must be a string"):
        assert expected in report


def test_bad_rows_rejected_when_the_recipe_says_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", BAD_FILE)
    with pytest.raises(RecipeError) as err:
        load_samples(path, "data.train", Encoder(TOK, DataConfig(max_seq_len=64)), "error")
    text = str(err.value)
    assert "6 bad row(s)" in text and "line 2:" in text
    assert "line 4: over-long sample: 105 tokens > data.max_seq_len 64" in text


def test_cli_rejects_bad_rows_before_training(tmp_path, capsys):
    from automoe.train.cli import main

    path = write_jsonl(tmp_path / "d.jsonl", BAD_FILE)
    out = tmp_path / "run"
    assert main(["--data.train", path, "--data.bad_rows", "error", "--output.dir", str(out)]) == 2
    assert "line 3: empty completion" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_prompt_tokens_carry_no_loss():
    enc = Encoder(TOK, DataConfig())
    s = enc.encode({"prompt": "hello", "completion": "olleh"})
    assert TOK.decode(s.input_ids) == "<bos><|user|>hello<|assistant|>olleh<eos>"
    assert targets(s) == "olleh<eos>"
    # label t is token t+1, and only where token t+1 belongs to the completion
    first = s.labels.index(next(t for t in s.labels if t != IGNORE))
    assert TOK.convert_ids_to_tokens(s.input_ids[first]) == "<|assistant|>"
    plain = Encoder(TOK, DataConfig(chat_template=False)).encode({"prompt": "ab", "completion": "ba"})
    assert TOK.decode(plain.input_ids) == "<bos>abba<eos>" and targets(plain) == "ba<eos>"


def test_chat_messages_train_only_assistant_turns():
    enc = Encoder(TOK, DataConfig())
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                        {"role": "assistant", "content": "ba"}, {"role": "user", "content": "cd"},
                        {"role": "assistant", "content": "dc"}]}
    s = enc.encode(row)
    rendered = "<bos><|system|>be brief<|user|>ab<|assistant|>ba<eos><|user|>cd<|assistant|>dc<eos>"
    assert TOK.decode(s.input_ids) == rendered
    assert targets(s) == "ba<eos>dc<eos>"
    with pytest.raises(RecipeError, match="chat messages need a chat template"):
        Encoder(TOK, DataConfig(chat_template=False)).encode(row)


def test_packing_masks_attention_per_document():
    """A packed row gives each document the logits it gets alone: nothing attends across documents."""
    from tiny_configs import make_config

    from automoe import AutoMoEForCausalLM

    torch.manual_seed(0)
    model = AutoMoEForCausalLM.from_config(make_config("qwen3_moe", vocab_size=len(TOK))).eval()
    enc = Encoder(TOK, DataConfig())
    docs = [enc.encode({"prompt": p, "completion": p[::-1]}) for p in ("abc", "hello", "zz")]
    rows = pack(docs, 40, packing=True)
    assert [len(r) for r in rows] == [3]
    batch = collate(rows, 40, TOK.pad_token_id)
    assert batch["position_ids"][0, : len(docs[0].input_ids) + 1].tolist()[-1] == 0  # restarts
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for d in docs:
            alone = model(input_ids=torch.tensor([d.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(d.input_ids)], alone, atol=1e-5, rtol=1e-5)
            start += len(d.input_ids)
    assert [len(r) for r in pack(docs, 40, packing=False)] == [1, 1, 1]


def test_json_array_and_parquet_files(tmp_path):
    enc = Encoder(TOK, DataConfig())
    rows = [{"prompt": "ab", "completion": "ba"}, {"prompt": "cd", "completion": ""},
            {"prompt": "ef", "completion": "fe"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    messages = []
    got = load_samples(str(tmp_path / "d.json"), "data.train", enc, "skip", messages.append)
    assert [targets(s) for s in got] == ["ba<eos>", "fe<eos>"] and "row 2: empty completion" in messages[0]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    messages = []
    got = load_samples(str(tmp_path / "d.parquet"), "data.validation", enc, "skip", messages.append)
    assert [targets(s) for s in got] == ["ba<eos>", "fe<eos>"] and "row 2: empty completion" in messages[0]


def test_unsupported_file_type(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(RecipeError, match="unsupported data file type '.txt'"):
        load_samples(str(tmp_path / "d.txt"), "data.train", Encoder(TOK, DataConfig()), "skip")


def test_batch_plan_is_a_function_of_the_step_and_splits_over_ranks():
    from automoe.train.data import BatchPlan, micro_batches

    rows = [[i] for i in range(10)]
    plan = BatchPlan(rows, rows_per_step=4, seed=3, shuffle=True)
    assert plan.steps_per_epoch == 2 and plan.total_steps(0, 3) == 6
    first = [plan.step_rows(s) for s in range(6)]
    assert [BatchPlan(rows, 4, 3, True).step_rows(s) for s in (5, 0, 3)] == [first[5], first[0], first[3]]
    assert first[0] + first[1] != first[2] + first[3]  # reshuffled every epoch
    assert len({r[0] for r in first[0] + first[1]}) == 8  # no row twice within an epoch
    # 2 ranks x 2 micro-steps of 1 row read the global batch exactly once
    parts = [m for a in range(2) for m in micro_batches(first[0], 1, 2, a, 2)]
    assert sorted(r[0] for p in parts for r in p) == sorted(r[0] for r in first[0])
    with pytest.raises(RecipeError, match="train.batch_size"):
        BatchPlan(rows, rows_per_step=11, seed=0, shuffle=False)


def test_a_non_utf8_line_is_a_bad_row_named_by_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "ab", "completion": "ba"}).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "a\xff", "completion": "x"}\n' + good + b"\n")
    messages = []
    samples = load_samples(str(path), "data.train", Encoder(TOK, DataConfig(max_seq_len=64)), "skip", messages.append)
    assert len(samples) == 2
    assert "line 2: not UTF-8 text (byte b'\\xff' at column 14)" in messages[0]


def test_wrong_keys_are_one_line_with_a_hint_not_one_line_per_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": "a"} for i in range(400)])
    with pytest.raises(RecipeError) as err:
        load_samples(path, "data.train", Encoder(TOK, DataConfig(max_seq_len=64)), "skip")
    text = str(err.value)
    assert len(text.splitlines()) <= 4, text
    assert "line 1, line 2, line 3, line 4, line 5 and 395 more: missing field 'prompt'" in text
    assert "the rows have the keys ['answer', 'question']: name yours with data.prompt_field" in text


def test_characters_the_tokenizer_does_not_know_are_reported(tmp_path):
    rows = [{"prompt": "café", "completion": "éfac"}, {"prompt": "ab", "completion": "ba"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    messages = []
    samples = load_samples(path, "data.train", Encoder(TOK, DataConfig(max_seq_len=64)), "skip", messages.append)
    assert len(samples) == 2
    assert "1 row(s) hold characters the tokenizer does not know, trained as <unk>" in messages[0]
    assert "line 1" in messages[0]
