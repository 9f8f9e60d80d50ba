"""AutoMoEForCausalLM: transformers' AutoModelForCausalLM with the MoE blocks swapped for automoe's."""

from __future__ import annotations

import warnings
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel

from .moe.block import MoEBlock
from .optimize import AutoMoEWarning, optimize_model
from .options import AutoMoEOptions


def _optimize(model: PreTrainedModel, options: AutoMoEOptions, hf_kwargs: dict) -> PreTrainedModel:
    model = optimize_model(model, options)
    requested = hf_kwargs.get("experts_implementation")
    if requested is not None and any(isinstance(m, MoEBlock) for m in model.modules()):
        warnings.warn(
            f"automoe: experts_implementation={requested!r} applies only to MoE blocks automoe leaves to "
            f"transformers; automoe's blocks run experts_backend={options.experts_backend!r}. Pass "
            "automoe_options={'enabled': False} to run transformers' own experts.",
            AutoMoEWarning,
            stacklevel=3,
        )
    return model


class AutoMoEForCausalLM(AutoModelForCausalLM):
    """Drop-in for AutoModelForCausalLM. Returns the family's own HF class (e.g. Qwen3MoeForCausalLM),
    whose MoE blocks are automoe's; every HF keyword passes through unchanged.

    Extra keywords: `automoe_options` (an AutoMoEOptions or dict: enabled, experts_backend, router) and
    `distributed_setup` (from `create_distributed_setup_from_config`).
    """

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Any,
        *model_args: Any,
        automoe_options: AutoMoEOptions | dict | bool | None = None,
        distributed_setup: Any = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        options = AutoMoEOptions.coerce(automoe_options)
        if distributed_setup is not None:
            from .distributed.load import load_pretrained_distributed

            return load_pretrained_distributed(pretrained_model_name_or_path, distributed_setup, options, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return _optimize(model, options, kwargs)

    @classmethod
    def from_config(
        cls,
        config: Any,
        automoe_options: AutoMoEOptions | dict | bool | None = None,
        distributed_setup: Any = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        options = AutoMoEOptions.coerce(automoe_options)
        if distributed_setup is not None:
            from .distributed.load import build_from_config_distributed

            return build_from_config_distributed(config, distributed_setup, options, **kwargs)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        return _optimize(model, options, kwargs)
