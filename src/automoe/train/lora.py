"""The recipe's `lora:` section: peft's LoRA on the built model, and its two outputs (adapter, merged model)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import LoraSection, RecipeError
from .runtime import Runtime


def add_lora(model: nn.Module, section: LoraSection, rt: Runtime) -> nn.Module:
    """The peft model: adapters on `section`'s targets, everything else frozen."""
    if rt.setup is not None:
        raise RecipeError("lora: runs in one process for now; unset `distributed` (LoRA fits a 30B MoE on one GPU)")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise RecipeError("lora: needs peft, which is not installed: pip install 'automoe[lora]'") from err

    config = LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                        target_modules=section.target_modules, target_parameters=section.target_parameters)
    return get_peft_model(model, config)


def save_adapter_and_merge(model: nn.Module, adapter_dir: Path, rt: Runtime) -> nn.Module:
    """Writes peft's standard adapter to `adapter_dir` and returns the base with the adapters merged in."""
    if rt.is_main:
        model.save_pretrained(adapter_dir)
    return model.merge_and_unload()
