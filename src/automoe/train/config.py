"""The recipe: nested dataclasses read from YAML, overridden by dotted command-line keys, strictly checked.

Every key is declared here with its type, so an unknown key or a wrong type stops the run before anything is
built, with a message naming the dotted key. The defaults are the embedded recipe (`automoe finetune`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable
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
    """Either a local HF checkpoint (`path`) or a config to build with random init (`config`); a recipe that sets
    one clears the other's default. A recipe's `config` replaces the default one whole."""

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
    peak_tflops: float = 0.0  # for MFU; 0 picks the GPU's datasheet dense peak (none on CPU)
    progress: bool = True
    max_nonfinite_steps: int = 3  # a step whose loss or gradient norm is NaN/inf is skipped; past this many, stop
    collective_timeout_s: float = 300.0  # under torchrun: how long a rank waits for the others before giving up


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
    overwrite: bool = False  # true: a fresh run (no --resume) replaces an earlier run in dir; false: that is an error


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


def at_least(low: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v >= low), f"at least {low:g}"


def above(low: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v > low), f"above {low:g}"


def between(low: float, high: float, *, high_open: bool = False) -> tuple[Callable[[float], bool], str]:
    if high_open:
        return (lambda v: low <= v < high), f"in [{low:g}, {high:g})"
    return (lambda v: low <= v <= high), f"in [{low:g}, {high:g}]"


# The range of every numeric key, checked when the key is set (a list's bound holds for each item).
BOUNDS = {
    "seed": at_least(0),
    "data.max_seq_len": at_least(2),
    "optim.lr": above(0),
    "optim.weight_decay": at_least(0),
    "optim.betas": between(0, 1, high_open=True),
    "optim.eps": above(0),
    "schedule.warmup_steps": at_least(0),
    "schedule.min_lr_ratio": between(0, 1),
    "train.max_steps": at_least(0),
    "train.epochs": at_least(0),
    "train.batch_size": at_least(1),
    "train.grad_accum": at_least(1),
    "train.grad_clip": at_least(0),
    "train.router_aux_loss_coef": at_least(0),
    "train.log_every": at_least(1),
    "train.eval_every": at_least(0),
    "train.save_every": at_least(0),
    "train.peak_tflops": at_least(0),
    "train.max_nonfinite_steps": at_least(0),
    "train.collective_timeout_s": above(0),
    "eval.num_samples": at_least(0),
    "eval.max_new_tokens": at_least(1),
    "eval.batch_size": at_least(1),
    "output.keep_checkpoints": at_least(1),
}

# Keys of which a recipe sets one: setting one (in the file, or in an override) clears the other's default.
EXCLUSIVE = [("model.path", "model.config")]


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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise RecipeError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(number):
            raise RecipeError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise TypeError(f"recipe field {key} has an unsupported type {tp}")


def _check_bounds(key: str, value: Any) -> None:
    if key not in BOUNDS or value is None:
        return
    ok, text = BOUNDS[key]
    for item in value if isinstance(value, list) else [value]:
        if not ok(item):
            raise RecipeError(f"{key}: must be {text}, got {value!r}")


def _merge(obj: Any, values: dict[str, Any], prefix: str = "", seen: set[str] | None = None) -> None:
    """Set `values` onto the dataclass `obj`, recursing into nested sections; unknown keys are errors. A mapping
    value (model.config, distributed) replaces the default one whole; `seen` collects the dotted keys set."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]!s}?)" if close else ""
            raise RecipeError(f"unknown recipe key {dotted!r}{hint}; valid keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise RecipeError(f"{dotted}: expected a section (mapping), got {type(value).__name__} {value!r}")
            _merge(current, value, dotted + ".", seen)
            continue
        value = _check_value(dotted, value, hints[key])
        if dotted in CHOICES and value not in CHOICES[dotted]:
            raise RecipeError(f"{dotted}: {value!r} is not one of {', '.join(CHOICES[dotted])}")
        _check_bounds(dotted, value)
        setattr(obj, key, value)
        if seen is not None:
            seen.add(dotted)


def _override(recipe: Recipe, key: str, value: Any) -> dict[str, Any]:
    """The nested mapping that sets one dotted key. A key that goes inside a mapping-valued field
    (`--model.config.num_experts 4`) changes that one entry of the current mapping, not the whole mapping."""
    parts = key.split(".")
    obj: Any = recipe
    depth = 0
    while depth < len(parts) - 1 and dataclasses.is_dataclass(getattr(obj, parts[depth], None)):
        obj = getattr(obj, parts[depth])
        depth += 1
    inner = parts[depth + 1:]
    current = getattr(obj, parts[depth], None) if dataclasses.is_dataclass(obj) else None
    if inner and (current is None or isinstance(current, dict)) and parts[depth] in typing.get_type_hints(type(obj)):
        whole = dict(current or {})
        entry = whole
        for part in inner[:-1]:
            entry[part] = dict(entry.get(part) or {})
            entry = entry[part]
        entry[inner[-1]] = value
        value, parts = whole, parts[: depth + 1]
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _apply(recipe: Recipe, values: dict[str, Any]) -> None:
    """Merge one layer (the file, or one override) and settle the exclusive pairs it touched."""
    seen: set[str] = set()
    _merge(recipe, values, seen=seen)
    for a, b in EXCLUSIVE:
        for mine, other in ((a, b), (b, a)):
            if mine in seen and other not in seen and _get(recipe, mine) is not None:
                _set(recipe, other, None)
        if a in seen and b in seen and _get(recipe, a) is not None and _get(recipe, b) is not None:
            raise RecipeError(f"set one of {a} or {b}, not both")


def _get(recipe: Recipe, dotted: str) -> Any:
    obj: Any = recipe
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(recipe: Recipe, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    setattr(_get(recipe, ".".join(parents)) if parents else recipe, name, value)


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
        _apply(recipe, values)
    for key, value in overrides:
        _apply(recipe, _override(recipe, key, value))
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    """Checks that need more than one key, or the model's config class."""
    m, t = recipe.model, recipe.train
    if (m.path is None) == (m.config is None):
        raise RecipeError("model: set exactly one of model.path (a local HF checkpoint) or model.config")
    if m.config is not None and "model_type" not in m.config:
        raise RecipeError("model.config: needs a model_type, e.g. model_type: qwen3_moe")
    if m.tokenizer == "model" and m.path is None:
        raise RecipeError("model.tokenizer: 'model' needs model.path; use 'char' or a local tokenizer path")
    if (t.max_steps > 0) == (t.epochs > 0):
        raise RecipeError("train: set exactly one of train.max_steps or train.epochs (the other to 0)")
    if len(recipe.optim.betas) != 2:
        raise RecipeError(f"optim.betas: needs two numbers, got {recipe.optim.betas}")
    if m.config is not None:
        check_model_config(recipe)  # a model.path is checked when the run starts (the files are read then)


EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")
# keys that models read with getattr although their config class does not declare them (kept as attributes)
COMMON_CONFIG_KEYS = {"head_dim", "rope_theta", "rope_scaling"}


def check_model_config(recipe: Recipe) -> None:
    """model.config keys against the config class (a near-miss of a known key is a typo; other keys are kept as
    attributes, which some models read), top-k against the
    expert count, data.max_seq_len against max_position_embeddings."""
    from transformers import CONFIG_MAPPING, AutoConfig

    m = recipe.model
    if m.config is not None:
        values = {k: v for k, v in m.config.items() if k != "model_type"}
        model_type = m.config["model_type"]
        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING), n=1)
            raise RecipeError(f"model.config.model_type: unknown model type {model_type!r}"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
        cls = CONFIG_MAPPING[model_type]
        known = set(cls().to_dict()) | set(inspect.signature(cls.__init__).parameters) | set(cls.attribute_map)
        for key in values:
            close = difflib.get_close_matches(key, sorted(known | COMMON_CONFIG_KEYS), n=1, cutoff=0.8)
            if key not in known | COMMON_CONFIG_KEYS and close:
                raise RecipeError(f"model.config.{key}: not a key of {cls.__name__}; did you mean {close[0]}?")
        try:
            config = cls(**values)
        except (ValueError, TypeError) as e:
            raise RecipeError(f"model.config: {cls.__name__} refuses these values: {e}") from e
    else:
        if not Path(m.path).is_dir():
            raise RecipeError(f"model.path: no local checkpoint directory at {m.path}")
        try:
            config = AutoConfig.from_pretrained(m.path)
        except (OSError, ValueError) as e:
            raise RecipeError(f"model.path: {m.path} holds no readable config.json ({e})") from e
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    experts = next((getattr(config, k) for k in EXPERT_COUNT_KEYS if isinstance(getattr(config, k, None), int)), None)
    top_k = next((getattr(config, k) for k in TOP_K_KEYS if isinstance(getattr(config, k, None), int)), None)
    if experts is not None and top_k is not None and not 1 <= top_k <= experts:
        raise RecipeError(f"model.config: top-k ({top_k}) must be between 1 and the expert count ({experts})")
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and recipe.data.max_seq_len > positions:
        raise RecipeError(f"data.max_seq_len: {recipe.data.max_seq_len} is above the model's max_position_embeddings "
                          f"({positions}); lower data.max_seq_len or raise model.config.max_position_embeddings")
