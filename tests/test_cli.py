"""What a new user meets first (issue 17, item 8): `automoe --version`, whole help texts, a bench figure without
an empty sweep panel, a CPU torchrun command in the README, and a dense model left as plain transformers."""

from __future__ import annotations

import re
import shlex
import struct
from pathlib import Path

import pytest
import transformers

import automoe
from automoe import AutoMoEForCausalLM, cli
from automoe.bench import cli as bench_cli
from automoe.bench import report
from automoe.train import cli as train_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"automoe {automoe.__version__}"


def test_bench_help_is_whole_sentences_and_names_every_option(capsys):
    with pytest.raises(SystemExit):
        bench_cli.parse(["--help"])
    text = capsys.readouterr().out
    description = text.split("options:")[0].split("\n\n", 1)[1]
    assert " ".join(description.split()).endswith("."), description
    for option in ("--seq", "--batch", "--warmup", "--kernels", "--device", "--seed"):
        entry = re.search(rf"^  {option}\b.*?(?=^  -)", text + "  -", flags=re.M | re.S).group(0)
        assert len(entry.split()) > 3, f"{option} has no help: {entry!r}"


def _png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def test_bench_figure_has_a_sweep_panel_only_for_a_sweep(tmp_path):
    pytest.importorskip("matplotlib")

    def run(seq):
        return {"seq": seq, "batch": 1, "step_tps": 1000.0 / seq}

    def result(seqs):
        return {"workload": "tiny", "args": {"seq": seqs[0], "batch": 1},
                "columns": [{"label": "automoe", "runs": [run(s) for s in seqs]}]}

    one = report._plot(result([32]), tmp_path / "one.png")
    two = report._plot(result([32, 64]), tmp_path / "two.png")
    assert _png_width(one) < 0.6 * _png_width(two), "one sequence length draws the bar chart alone"


def test_readme_has_a_cpu_torchrun_command_the_recipe_accepts(capsys):
    lines = [line.split("#")[0].strip() for line in README.read_text().splitlines()]
    cpu = [line for line in lines if line.startswith("torchrun") and "--device cpu" in line]
    assert cpu, "the README shows how to run several processes on CPUs"
    argv = shlex.split(cpu[0])
    args = argv[argv.index("finetune") + 1:]
    assert train_cli.main(args + ["--print-recipe"]) == 0
    printed = capsys.readouterr().out
    assert "device: cpu" in printed and "ep_size: 2" in printed


def test_dense_model_loads_as_plain_transformers():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=16, attn_implementation="sdpa")
    model = AutoMoEForCausalLM.from_config(config, attn_implementation="sdpa")
    plain = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()], "no module swapped"
    assert "forward" not in vars(model), "no instance forward"
