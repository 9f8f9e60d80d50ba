"""Build the tokenizer and the automoe model a recipe names; export the result as a standard HF checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from automoe import AutoMoEForCausalLM

from .config import ModelConfig, RecipeError
from .runtime import Runtime
from .tokenizer import build_char_tokenizer


def build_tokenizer(cfg: ModelConfig) -> Any:
    if cfg.tokenizer == "char":
        return build_char_tokenizer()
    source = cfg.path if cfg.tokenizer == "model" else cfg.tokenizer
    if not Path(source).exists():
        raise RecipeError(f"model.tokenizer: tokenizer not found: {source}")
    return AutoTokenizer.from_pretrained(source)


def build_config(cfg: ModelConfig, tokenizer: Any, aux_loss: bool) -> Any:
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
    config.output_router_logits = aux_loss
    return config


def build_model(cfg: ModelConfig, tokenizer: Any, rt: Runtime, seed: int, aux_loss: bool) -> nn.Module:
    """The same random init on every rank (seeded), then automoe's blocks, then the distributed setup."""
    dtype = getattr(torch, cfg.dtype)
    kwargs: dict[str, Any] = dict(dtype=dtype, automoe_options=cfg.automoe_options or None)
    if rt.setup is not None:
        kwargs["distributed_setup"] = rt.setup
    torch.manual_seed(seed)
    if cfg.path is not None:
        if not Path(cfg.path).is_dir():
            raise RecipeError(f"model.path: no local checkpoint directory at {cfg.path}")
        model = AutoMoEForCausalLM.from_pretrained(cfg.path, output_router_logits=aux_loss, **kwargs)
    else:
        model = AutoMoEForCausalLM.from_config(build_config(cfg, tokenizer, aux_loss), **kwargs)
    if rt.setup is None:
        model.to(rt.device)
    if cfg.activation_checkpointing and rt.setup is None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    return model


def export_hf(model: nn.Module, tokenizer: Any, out: Path, rt: Runtime) -> Path | None:
    """A standard HF checkpoint + tokenizer in `out` (rank 0 writes; sharded tensors are gathered first)."""
    state_dict = None
    if rt.setup is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rt.is_main:
        return None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    return out
