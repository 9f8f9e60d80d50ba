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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--schedule.warmup_steps", "-5"], "schedule.warmup_steps: must be at least 0, got -5"),
        (["--schedule.min_lr_ratio", "5"], "schedule.min_lr_ratio: must be in [0, 1], got 5.0"),
        (["--train.grad_clip", "-1"], "train.grad_clip: must be at least 0"),
        (["--train.save_every", "-1"], "train.save_every: must be at least 0"),
        (["--output.keep_checkpoints", "0"], "output.keep_checkpoints: must be at least 1"),
        (["--output.keep_checkpoints", "-1"], "output.keep_checkpoints: must be at least 1"),
        (["--optim.lr", "-1e-3"], "optim.lr: must be above 0"),
        (["--optim.lr", "nan"], "optim.lr: expected a finite number"),
        (["--optim.betas", "[0.9, 1.5]"], "optim.betas: must be in [0, 1)"),
        (["--model.config.hiden_size", "32"], "model.config.hiden_size: not a key of Qwen3MoeConfig; did you mean "
                                              "hidden_size?"),
        (["--model.config.num_experts_per_tok", "9"], "top-k (9) must be between 1 and the expert count (8)"),
        (["--data.max_seq_len", "200"], "data.max_seq_len: 200 is above the model's max_position_embeddings (128)"),
        (["--optim.lrr", "1"], "unknown recipe key 'optim.lrr' (did you mean optim.lr?)"),
    ],
)
def test_nonsense_values_are_refused_when_the_recipe_loads(args, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(overrides=parse_overrides(args))
    assert message in str(err.value)


def test_ep_size_on_one_process_is_an_error():
    from automoe.train.runtime import init_runtime

    with pytest.raises(RecipeError, match=r"distributed.ep_size: 2 needs 2 processes.*torchrun --nproc-per-node 2"):
        init_runtime(load_recipe(overrides=parse_overrides(["--distributed", "{ep_size: 2}"])))


def test_a_recipes_model_config_replaces_the_default_one(tmp_path):
    path = tmp_path / "mixtral.yaml"
    path.write_text("model:\n  config:\n    model_type: mixtral\n    hidden_size: 64\n    num_hidden_layers: 1\n"
                    "    num_attention_heads: 4\n    num_key_value_heads: 2\n    num_local_experts: 4\n"
                    "    num_experts_per_tok: 2\n    intermediate_size: 64\n    max_position_embeddings: 128\n")
    config = load_recipe(path).model.config
    assert config["num_local_experts"] == 4
    assert not {"num_experts", "tie_word_embeddings", "norm_topk_prob", "head_dim"} & set(config)
    # a dotted override still changes one entry of the current mapping
    config = load_recipe(path, parse_overrides(["--model.config.num_local_experts", "2"])).model.config
    assert config["num_local_experts"] == 2 and config["model_type"] == "mixtral" and config["hidden_size"] == 64


def test_a_recipe_with_only_model_path_loads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  path: /models/some-checkpoint\n  tokenizer: model\n")
    recipe = load_recipe(path)
    assert recipe.model.path == "/models/some-checkpoint" and recipe.model.config is None
    both = tmp_path / "both.yaml"
    both.write_text("model:\n  path: /m\n  config: {model_type: qwen3_moe}\n")
    with pytest.raises(RecipeError, match="set one of model.path or model.config, not both"):
        load_recipe(both)


def test_the_first_readme_command_has_what_it_needs_to_draw_loss_png():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("matplotlib") for dep in project["dependencies"])
