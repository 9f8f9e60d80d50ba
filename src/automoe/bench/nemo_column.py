"""The NeMo AutoModel column: its `NeMoAutoModelForCausalLM` on the bench's workload, trained as its recipes train it.

NeMo pins its own transformers (0.7.0: 5.18.0), so it is installed into a folder of its own
(`pip install --no-deps --target DIR`) and only this column's process gets DIR first on its path (`child_env`);
the other columns keep the image's transformers.

Its custom models (Qwen3-MoE, DeepSeek-V3, ...) return logits only: the loss is computed here the way its
training recipe does (labels shifted by one with -100 at the end, its loss module summed over the label tokens
and divided by their count, through its own `calculate_loss`): its fused linear cross-entropy where
cut-cross-entropy imports, else its masked cross-entropy. The custom path is tried first; if it fails to build
or to train its first step, its HF path (`force_hf=True`), and both errors are kept.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.machinery
import importlib.metadata
import os
import sys
import traceback
from types import SimpleNamespace

import torch
from torch import nn

IGNORE_INDEX = -100
PATHS = ("custom", "hf")  # tried in this order


def importable(nemo_path: str | None) -> bool:
    """Whether `nemo_automodel` imports in the column's process (with `nemo_path` first on its path)."""
    search = ([nemo_path] if nemo_path else []) + sys.path
    return importlib.machinery.PathFinder.find_spec("nemo_automodel", search) is not None


def child_env(nemo_path: str | None) -> dict[str, str]:
    """The environment of the column's process: `nemo_path` ahead of everything else on PYTHONPATH."""
    env = dict(os.environ)
    if nemo_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(nemo_path), env.get("PYTHONPATH")) if p)
    return env


def shifted_labels(tokens: torch.Tensor) -> torch.Tensor:
    """Next-token targets as NeMo's datasets give them: position t holds token t+1, the last is ignored."""
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, :-1] = tokens[:, 1:]
    return labels


def recipe_loss(model: nn.Module, loss_fn: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """One forward and the loss as NeMo's train_ft recipe computes it: a linear cross-entropy gets the final
    hidden states (logits of the last position only), any other loss the logits; the sum over label tokens is
    divided by their number (known without a device sync: every position but the last of each row)."""
    from nemo_automodel.components.loss.linear_ce_base import LinearCrossEntropy
    from nemo_automodel.components.loss.utils import calculate_loss
    from nemo_automodel.components.training.model_output_utils import get_final_hidden_states

    linear = isinstance(loss_fn, LinearCrossEntropy)
    extra = {"logits_to_keep": 1, "output_hidden_states": True} if linear else {}
    out = model(input_ids=tokens, **extra)
    return calculate_loss(loss_fn, logits=out.logits, labels=shifted_labels(tokens), model=model,
                          hidden_states=get_final_hidden_states(out),
                          num_label_tokens=tokens.shape[0] * (tokens.shape[1] - 1))


class RecipeLossModel(nn.Module):
    """A NeMo model with its recipe's loss, callable as the bench calls a model: `model(input_ids=, labels=)`
    returns an object with `.loss` (the bench's labels are the tokens, as for the other columns)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        if labels is not input_ids:  # identity, not equality: no device sync per step
            raise ValueError("RecipeLossModel trains on labels = input_ids (the bench's tokens); got other labels")
        return SimpleNamespace(loss=recipe_loss(self.model, self.loss_fn, input_ids))


def loss_module() -> tuple[nn.Module, str]:
    """Its fused linear cross-entropy where cut-cross-entropy imports, else its masked cross-entropy."""
    from nemo_automodel.components.loss import linear_ce
    from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy

    if linear_ce.HAVE_CUT_CROSS_ENTROPY:
        return linear_ce.FusedLinearCrossEntropy(), "FusedLinearCrossEntropy (cut-cross-entropy; sum / label tokens)"
    return MaskedCrossEntropy(), ("MaskedCrossEntropy (logits upcast to fp32; sum / label tokens; its fused linear "
                                  "CE needs cut-cross-entropy, not importable)")


def backend_config(router: str):
    """NeMo's BackendConfig for one GPU without TransformerEngine or DeepEP: its defaults there (sdpa attention,
    torch linear, fp32 RMSNorm, torch_mm experts = torch._grouped_mm, torch dispatcher); `--router balanced` maps
    to its fake_balanced_gate."""
    from nemo_automodel.components.models.common.utils import BackendConfig

    return BackendConfig(fake_balanced_gate=router == "balanced")


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _causal_lm_config(config):
    """A copy naming its causal-LM architecture: NeMo picks its custom model by `config.architectures[0]`
    (a config built from its class names none, and NeMo then silently uses the HF model)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = copy.deepcopy(config)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def load_reference_weights(model: nn.Module, config, seed: int, custom: bool) -> None:
    """The weights the other columns start from (the HF model's init from `seed`, on the model's device), into
    NeMo's model: through its state-dict adapter for a custom model (HF checkpoint keys in, its layout out), as they
    are for its HF path. Same weights, same routing: the columns route the same tokens to the same experts."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    torch.manual_seed(seed)
    with next(model.parameters()).device:
        reference = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    state = reference.state_dict()
    if custom:
        state = model.state_dict_adapter.from_hf(revert_weight_conversion(reference, state))
    model.load_state_dict(state, strict=True)


def build(path: str, config, router: str, seed: int) -> tuple[RecipeLossModel, dict]:
    """NeMo's model for `config` on the current GPU in bf16 with the other columns' weights (`seed`), by its custom
    path or its HF path, with the recipe loss; and what it ran with, for the JSON and the table."""
    from nemo_automodel import NeMoAutoModelForCausalLM

    # the HF path hands every extra keyword to the HF model's constructor, which takes no `backend`
    backend = backend_config(router)
    extra = {"force_hf": True} if path == "hf" else {"backend": backend}
    model = NeMoAutoModelForCausalLM.from_config(_causal_lm_config(config), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", **extra)
    ran = getattr(model, "backend", None)
    custom = isinstance(ran, type(backend))  # its custom models keep their BackendConfig, HF models have none
    if path == "custom" and not custom:
        raise RuntimeError(f"NeMo built {type(model).__module__}.{type(model).__name__}, not a custom model")
    load_reference_weights(model, config, seed, custom)
    loss_fn, loss_name = loss_module()
    info = {
        "path": path,
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "backend": _jsonable(dataclasses.asdict(ran)) if custom else None,
        "hf_implementations": None if custom else {
            "attn": getattr(model.config, "_attn_implementation", None),
            "experts": getattr(model.config, "_experts_implementation", None)},
        "loss": loss_name,
        # its HF path has no balanced gate: there the model's own router runs whatever --router asked
        "router": "balanced (fake_balanced_gate)" if custom and router == "balanced" else "model's own",
    }
    return RecipeLossModel(model, loss_fn), info


def versions() -> dict:
    out = {}
    for name in ("nemo-automodel", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def error_text(error: BaseException) -> str:
    """The exception and the innermost frames of its traceback, short enough for the table and the JSON."""
    frames = traceback.extract_tb(error.__traceback__)[-3:]
    where = "; ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames)
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''} [{where}]"


def label(info: dict) -> str:
    if info["path"] == "custom":
        backend = info["backend"] or {}
        return f"NeMo AutoModel (custom, {backend.get('experts')} experts, {backend.get('attn')})"
    return "NeMo AutoModel (HF path)"


def notes(info: dict | None, errors: dict[str, str]) -> list[str]:
    """Lines for the table: what the column ran with, and what failed on the way."""
    lines = []
    if info is not None:
        lines.append(f"NeMo AutoModel ran its {info['path']} path: {info['model_class']}, {info['router']} router; "
                     f"loss {info['loss']}")
        if info["backend"]:
            keys = ("attn", "linear", "rms_norm", "rope", "rope_fusion", "experts", "dispatcher", "fake_balanced_gate",
                    "gate_precision", "compile_attn", "compile_router_weight", "te_fp8")
            lines.append("  BackendConfig: " + ", ".join(f"{k}={info['backend'].get(k)}" for k in keys))
        if info["hf_implementations"]:
            lines.append(f"  HF implementations: {info['hf_implementations']}")
    lines += [f"NeMo AutoModel {path} path failed: {text}" for path, text in errors.items()]
    return lines
