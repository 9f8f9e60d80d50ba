"""Recipe checks: unknown keys, wrong types, missing files stop `automoe finetune` before any training."""

from __future__ import annotations

import pytest

from automoe.train.cli import main
from automoe.train.config import RecipeError, load_recipe, parse_overrides


def test_defaults_are_the_embedded_recipe():
    recipe = load_recipe()
    assert recipe.model.config["model_type"] == "qwen3_moe"
    assert recipe.data.train == "automoe:strings_train.jsonl"


def test_dotted_overrides_are_typed():
    args = ["--optim.lr", "1e-5", "--train.max_steps=7", "--data.packing", "false", "--optim.betas", "[0.8, 0.9]",
            "--distributed", "{ep_size: 2}", "--model.config.num_experts", "4"]
    recipe = load_recipe(overrides=parse_overrides(args))
    assert recipe.optim.lr == 1e-5 and isinstance(recipe.optim.lr, float)
    assert recipe.train.max_steps == 7
    assert recipe.data.packing is False
    assert recipe.optim.betas == [0.8, 0.9]
    assert recipe.distributed == {"ep_size": 2}
    assert recipe.model.config["num_experts"] == 4 and recipe.model.config["model_type"] == "qwen3_moe"


def test_a_flow_mapping_without_a_space_is_named_with_its_fix():
    with pytest.raises(RecipeError, match=r"--distributed: YAML reads 'ep_size:2' as one key.*\{ep_size: 2\}"):
        parse_overrides(["--distributed", "{ep_size:2}"])
    with pytest.raises(RecipeError, match=r"--model.config: YAML reads 'num_experts:4'"):
        parse_overrides(["--model.config", "{model_type: qwen3_moe, num_experts:4}"])
    assert parse_overrides(["--data.train", "automoe:strings_train.jsonl"]) == [
        ("data.train", "automoe:strings_train.jsonl")], "a colon inside a plain string is a value, not a key"


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("optim:\n  lrr: 0.1\n", "unknown recipe key 'optim.lrr'"),
        ("trian:\n  max_steps: 3\n", "unknown recipe key 'trian'"),
        ("train:\n  max_steps: ten\n", "train.max_steps: expected an integer, got str 'ten'"),
        ("data:\n  packing: 3\n", "data.packing: expected true or false"),
        ("optim:\n  lr: fast\n", "optim.lr: expected a number"),
        ("optim: 0.1\n", "optim: expected a section"),
        ("data:\n  bad_rows: ignore\n", "data.bad_rows: 'ignore' is not one of skip, error"),
        ("train:\n  max_steps: 0\n", "set exactly one of train.max_steps or train.epochs"),
    ],
)
def test_bad_recipe_names_the_key(tmp_path, yaml_text, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml_text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value)


def test_cli_stops_before_training_and_names_the_problem(tmp_path, capsys):
    out = tmp_path / "run"
    cases = [
        (["-c", str(tmp_path / "nope.yaml")], "recipe file not found"),
        (["--train.max_step", "3"], "unknown recipe key 'train.max_step'"),
        (["--train.batch_size", "2.5"], "train.batch_size: expected an integer, got float 2.5"),
        (["--data.train", str(tmp_path / "missing.jsonl")], "data.train: data file not found"),
        (["--model.path", str(tmp_path / "no_model"), "--model.config", "null"], "model.path: no local checkpoint"),
    ]
    for args, message in cases:
        assert main(args + ["--output.dir", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not (out / "metrics.jsonl").exists()  # nothing trained


def test_example_recipes_load_and_the_default_one_is_the_embedded_default():
    from pathlib import Path

    from automoe.train.config import Recipe

    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
    assert {p.name for p in examples} >= {"tiny_default.yaml", "qwen3_30b_a3b_4gpu.yaml", "qwen3_30b_a3b_8gpu.yaml"}
    recipes = {p.name: load_recipe(p) for p in examples}
    assert recipes["tiny_default.yaml"] == Recipe()
    assert recipes["qwen3_30b_a3b_8gpu.yaml"].distributed["ep_size"] == 8
    assert recipes["qwen3_30b_a3b_4gpu.yaml"].distributed["ep_size"] == 4
