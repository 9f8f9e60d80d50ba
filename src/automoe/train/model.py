"""Build the tokenizer and the automoe model a recipe names; export the result as a standard HF checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from automoe import AutoMoEForCausalLM

from .config import ModelConfig, RecipeError
from .faults import pause_point
from .outdir import EXPORT_TMP, commit_export
from .runtime import Runtime, barrier
from .tokenizer import build_char_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def build_tokenizer(cfg: ModelConfig) -> Any:
    if cfg.tokenizer == "char":
        return build_char_tokenizer()
    source = cfg.path if cfg.tokenizer == "model" else cfg.tokenizer
    if not Path(source).exists():
        raise RecipeError(f"model.tokenizer: tokenizer not found: {source}")
    if Path(source).is_dir() and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        raise RecipeError(f"model.tokenizer: {source} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                          "save the tokenizer there, point model.tokenizer at a tokenizer directory, or use "
                          "model.tokenizer: char")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise RecipeError(f"model.tokenizer: cannot load the tokenizer in {source}: {e}") from e


def build_config(cfg: ModelConfig, tokenizer: Any, aux_coef: float) -> Any:
    """An HF config from the recipe's dict; vocabulary and special ids default to the tokenizer's."""
    values = dict(cfg.config)
    model_type = values.pop("model_type")
    values.setdefault("vocab_size", len(tokenizer))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, key, None) is not None:
            values.setdefault(key, getattr(tokenizer, key))
    if values["vocab_size"] < len(tokenizer):
        raise RecipeError(f"model.config.vocab_size: {values['vocab_size']} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens")
    try:
        config = AutoConfig.for_model(model_type, **values)
    except ValueError as e:
        raise RecipeError(f"model.config.model_type: {e}") from e
    config.output_router_logits = aux_coef > 0
    config.router_aux_loss_coef = aux_coef
    return config


def build_model(cfg: ModelConfig, tokenizer: Any, rt: Runtime, seed: int, aux_coef: float, scratch: Path) -> nn.Module:
    """automoe's model: from a local checkpoint or a seeded random init; sharded (EP + FSDP2) under torchrun."""
    dtype = getattr(torch, cfg.dtype)
    kwargs: dict[str, Any] = dict(dtype=dtype, automoe_options=cfg.automoe_options or None)
    torch.manual_seed(seed)
    path = cfg.path
    if path is not None and not Path(path).is_dir():
        raise RecipeError(f"model.path: no local checkpoint directory at {path}")
    if path is None and rt.setup is not None and cfg.init == "reference":
        path = str(scratch)
        if rt.is_main:  # the one-process init, written once, so every world size starts from the same weights
            AutoMoEForCausalLM.from_config(build_config(cfg, tokenizer, aux_coef), **kwargs).save_pretrained(path)
        barrier(rt)
    if rt.setup is not None:
        kwargs["distributed_setup"] = rt.setup
    if path is not None:
        try:
            model = AutoMoEForCausalLM.from_pretrained(path, output_router_logits=aux_coef > 0,
                                                       router_aux_loss_coef=aux_coef, **kwargs)
        except (OSError, ValueError) as e:  # a truncated or damaged checkpoint, on every rank alike
            raise RecipeError(f"model.path: cannot load the checkpoint in {path}: {e}") from e
    else:
        with torch.device(rt.device):  # initialise where it will train (a GPU inits 1B+ parameters in seconds)
            model = AutoMoEForCausalLM.from_config(build_config(cfg, tokenizer, aux_coef), **kwargs)
    if path == str(scratch):
        barrier(rt)
        if rt.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
    if rt.setup is None:
        model.to(rt.device)
    if cfg.activation_checkpointing and rt.setup is None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    return model


def export_hf(model: nn.Module, tokenizer: Any, out: Path, rt: Runtime) -> Path | None:
    """A standard HF checkpoint + tokenizer in `out` (rank 0 writes; sharded tensors are gathered first), written
    into a temporary directory beside it and renamed into place: a kill never leaves a half export in `out`."""
    tmp = out.with_name(EXPORT_TMP)
    if rt.setup is not None:  # collective: shards are gathered one layer at a time, rank 0 writes
        model.save_pretrained(str(tmp), overwrite=True)
    elif rt.is_main:
        model.save_pretrained(tmp)
    if rt.is_main:
        tokenizer.save_pretrained(tmp)
        pause_point("export")
        commit_export(tmp, out)
    barrier(rt)
    return out if rt.is_main else None
