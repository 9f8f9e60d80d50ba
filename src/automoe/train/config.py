"""The recipe: nested dataclasses read from YAML, overridden by dotted command-line keys, strictly checked.

Every key is declared here with its type, so an unknown key or a wrong type stops the run before anything is
built, with a message naming the dotted key. The defaults are the embedded recipe (`automoe finetune`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key or file and says how to fix it."""


def _tiny_qwen3_moe() -> dict[str, Any]:
    return dict(
        model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
        intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=True, norm_topk_prob=True,
    )


@dataclass
class ModelConfig:
    """Either a local HF checkpoint (`path`) or a config to build with random init (`config`)."""

    path: str | None = None
    config: dict[str, Any] | None = field(default_factory=_tiny_qwen3_moe)
    tokenizer: str = "char"  # "char" (built locally), "model" (the one saved with `path`), or a local path
    dtype: str = "float32"  # float32 | bfloat16
    automoe_options: dict[str, Any] = field(default_factory=dict)
    activation_checkpointing: bool = False  # one process; under torchrun use distributed.activation_checkpointing
    # random init under torchrun: "reference" builds the one-process model on rank 0 and loads its shards from
    # there (the same weights for any world size); "sharded" lets each rank initialise its own shards (no full
    # copy anywhere, for models too big for one host's memory; the weights then depend on the world size)
    init: str = "reference"


@dataclass
class DataConfig:
    """Rows are {prompt, completion} or {messages: [{role, content}, ...]}; loss only on completions/replies."""

    train: str = "automoe:strings_train.jsonl"  # JSONL, JSON or parquet; "automoe:NAME" is bundled data
    validation: str | None = "automoe:strings_val.jsonl"
    format: str = "auto"  # auto | prompt_completion | messages
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    chat_template: bool = True  # render rows with the tokenizer's chat template
    max_seq_len: int = 64
    packing: bool = True  # several samples per row, attention masked per document
    bad_rows: str = "skip"  # skip | error: what to do with a row that is malformed or too long
    shuffle: bool = True


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    warmup_steps: int = 30
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    max_steps: int = 400  # 0: run `epochs` epochs instead
    epochs: int = 0
    batch_size: int = 16  # packed rows per optimizer step, over all ranks: the same recipe, the same curve
    grad_accum: int = 1  # each rank's forward sees batch_size / (grad_accum x data-parallel ranks) rows
    grad_clip: float = 1.0  # 0 disables clipping
    router_aux_loss_coef: float = 0.0  # > 0 adds the model's load-balancing loss with this weight (per micro-batch)
    log_every: int = 10
    eval_every: int = 100  # validation loss every N steps (0: only at the end)
    save_every: int = 200  # resumable checkpoint every N steps (0: never)
    peak_tflops: float = 0.0  # for MFU; 0 picks the GPU's known bf16 peak (none on CPU)
    progress: bool = True


@dataclass
class EvalConfig:
    """Greedy generation on validation prompts, scored by exact match, before and after training."""

    generate: bool = True
    num_samples: int = 100
    max_new_tokens: int = 16
    batch_size: int = 50


@dataclass
class OutputConfig:
    dir: str = "outputs/finetune"
    keep_checkpoints: int = 2
    tensorboard: bool = True  # used when the tensorboard package is installed
    plot: bool = True  # loss curve PNG, when matplotlib is installed
    export: bool = True  # standard HF checkpoint + tokenizer in DIR/final
    overwrite: bool = True  # a fresh run (no --resume) replaces an earlier run's checkpoints; false: that is an error


@dataclass
class LoraSection:
    """LoRA through peft instead of a full fine-tune: only the adapters train; DIR/adapter is peft's adapter and
    DIR/final the merged model. Expert tensors are adapted through target_parameters (peft allows no dropout there)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    target_parameters: list[str] = field(
        default_factory=lambda: ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


@dataclass
class Recipe:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: dict[str, Any] | None = None  # the dict of automoe.create_distributed_setup_from_config
    lora: LoraSection = field(default_factory=LoraSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.init": ("reference", "sharded"),
    "data.format": ("auto", "prompt_completion", "messages"),
    "data.bad_rows": ("skip", "error"),
    "optim.name": ("adamw", "sgd"),
    "schedule.decay": ("cosine", "linear", "constant"),
    "device": ("auto", "cpu", "cuda"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """`value` as type `tp`, or a RecipeError naming `key`. Floats accept ints and numeric strings
    (YAML reads `1e-5` as a string)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(key, value, arg)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise TypeError(f"recipe field {key} has an unsupported type {tp}")


def _merge(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set `values` onto the dataclass `obj`, recursing into nested sections; unknown keys are errors."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise RecipeError(f"unknown recipe key {dotted!r}; valid keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise RecipeError(f"{dotted}: expected a section (mapping), got {type(value).__name__} {value!r}")
            _merge(current, value, dotted + ".")
            continue
        value = _check_value(dotted, value, hints[key])
        if isinstance(current, dict) and isinstance(value, dict):
            value = {**current, **value}  # `--model.config.num_experts 4` changes one entry, not the whole dict
        if dotted in CHOICES and value not in CHOICES[dotted]:
            raise RecipeError(f"{dotted}: {value!r} is not one of {', '.join(CHOICES[dotted])}")
        setattr(obj, key, value)


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`--a.b VALUE` or `--a.b=VALUE` pairs; values are read as YAML scalars (`true`, `3`, `[1, 2]`, `null`)."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise RecipeError(f"unexpected argument {arg!r}; overrides look like --optim.lr 1e-5")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise RecipeError(f"override {arg} needs a value, e.g. {arg} 10")
            key, raw = arg[2:], args[i + 1]
            i += 2
        value = yaml.safe_load(raw) if raw != "" else ""
        _check_flow_keys(key, value)
        pairs.append((key, value))
    return pairs


def _check_flow_keys(key: str, value: Any) -> None:
    """YAML reads `{ep_size:2}` as the one key 'ep_size:2' with no value (a flow mapping needs a space after the
    colon); say that, rather than let it surface later as an unknown key."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(k, str) and ":" in k and v is None:
            name, _, rest = k.partition(":")
            raise RecipeError(f"override --{key}: YAML reads {k!r} as one key with no value; put a space after "
                              f"the colon: {{{name}: {rest}}}")
        _check_flow_keys(key, v)


def load_recipe(path: str | Path | None = None, overrides: list[tuple[str, Any]] = ()) -> Recipe:
    """The default recipe, updated by the YAML file at `path`, then by dotted overrides."""
    recipe = Recipe()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe file {path} is not valid YAML: {e}") from e
        if not isinstance(values, dict):
            raise RecipeError(f"recipe file {path} must hold a mapping of sections, not {type(values).__name__}")
        _merge(recipe, values)
    for key, value in overrides:
        _merge(recipe, _nest(key, value))
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    """Checks that need more than one key."""
    m, t = recipe.model, recipe.train
    if (m.path is None) == (m.config is None):
        raise RecipeError("model: set exactly one of model.path (a local HF checkpoint) or model.config")
    if m.config is not None and "model_type" not in m.config:
        raise RecipeError("model.config: needs a model_type, e.g. model_type: qwen3_moe")
    if m.tokenizer == "model" and m.path is None:
        raise RecipeError("model.tokenizer: 'model' needs model.path; use 'char' or a local tokenizer path")
    if (t.max_steps > 0) == (t.epochs > 0):
        raise RecipeError("train: set exactly one of train.max_steps or train.epochs (the other to 0)")
    for key in ("batch_size", "grad_accum", "log_every"):
        if getattr(t, key) < 1:
            raise RecipeError(f"train.{key}: must be at least 1, got {getattr(t, key)}")
    if recipe.data.max_seq_len < 2:
        raise RecipeError(f"data.max_seq_len: must be at least 2, got {recipe.data.max_seq_len}")
    if len(recipe.optim.betas) != 2:
        raise RecipeError(f"optim.betas: needs two numbers, got {recipe.optim.betas}")
