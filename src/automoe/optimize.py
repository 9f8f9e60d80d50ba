"""Walk a built HF model and swap each recognised MoE block for automoe's MoEBlock, in place."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace

import torch
from torch import nn

from .describe import summary
from .families import NAMED_FAMILIES
from .families.recognize import (
    Unrecognized,
    block_spec,
    build_router,
    cpu_twin,
    find_experts,
    probe_input,
    scoring_weight,
)
from .kernels import apply_kernels
from .moe.adopt import adopt_tensors, hf_compatible_class
from .moe.block import MoEBlock
from .moe.experts import Experts, HFGate
from .moe.spec import BlockSpec
from .options import AutoMoEOptions

logger = logging.getLogger("automoe")

_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class AutoMoEWarning(UserWarning):
    """automoe left (part of) a model as plain transformers; the message says why."""


def is_moe_config(config) -> bool:
    return any(isinstance(getattr(config, k, None), int) and getattr(config, k) > 1 for k in _EXPERT_COUNT_KEYS)


def build_block(hf_block: nn.Module, spec: BlockSpec, options: AutoMoEOptions) -> MoEBlock:
    """An automoe block that owns the HF block's tensors (no copy) under the same names."""
    hf_experts = getattr(hf_block, spec.experts_attr)
    act_fn = HFGate(hf_experts) if spec.experts.activation == "hf_gate" else getattr(hf_experts, "act_fn", None)
    experts = hf_compatible_class(Experts, type(hf_experts))(spec.experts, act_fn, options.experts_backend)
    adopt_tensors(experts, hf_experts, list(spec.experts.tensor_names[: 4 if spec.experts.has_bias else 2]))
    router = getattr(hf_block, spec.router_attr)
    if spec.router is not None:
        router = build_router(router, spec.router, options.router == "balanced")
    elif options.router == "balanced":
        raise Unrecognized(f"router='balanced' needs a router automoe reproduces; {type(router).__name__} is not one")
    shared = getattr(hf_block, spec.shared_attr) if spec.shared_attr else None
    shared_gate = getattr(hf_block, spec.shared_gate_attr) if spec.shared_gate_attr else None
    known = {spec.router_attr, spec.experts_attr, spec.shared_attr, spec.shared_gate_attr}
    others = {name: child for name, child in hf_block.named_children() if name not in known}
    block = hf_compatible_class(MoEBlock, type(hf_block))(spec, router, experts, shared, shared_gate, others)
    adopt_tensors(block, hf_block, list(spec.router_tensors))
    # HF's child order, so named_parameters() and state_dict() list tensors exactly as HF does
    block._modules = {name: block._modules[name] for name, _ in hf_block.named_children()}
    block.train(hf_block.training)
    return block


def check_backend(spec: BlockSpec, options: AutoMoEOptions, dtype: torch.dtype) -> AutoMoEOptions:
    """The options to build with: grouped_mm needs every row of the expert matrices on a 16-byte boundary, so for
    another shape the experts run the per-expert loop instead (correct, slower), said once in a warning."""
    if options.experts_backend != "grouped_mm":
        return options
    itemsize = torch.empty((), dtype=dtype).element_size()
    for dim in (spec.experts.hidden_size, spec.experts.intermediate_size):
        if (dim * itemsize) % 16:
            warnings.warn(
                f"automoe: experts_backend='grouped_mm' needs hidden and expert intermediate sizes whose rows are "
                f"multiples of 16 bytes; this model has {dim} x {itemsize} bytes, so its experts run "
                "experts_backend='per_expert' (a loop over experts: correct, slower, no fused experts kernel).",
                AutoMoEWarning,
                stacklevel=4,
            )
            return replace(options, experts_backend="per_expert")
    return options


def verify_block(hf_block: nn.Module, block: MoEBlock) -> None:
    """Run the HF block and automoe's on the same few random tokens; a family matched by structure alone
    is only accelerated if they agree."""
    hidden = scoring_weight(getattr(block, block.spec.router_attr), block.spec.experts.num_experts).shape[1]
    weight = getattr(block, block.spec.experts_attr).down_proj
    x = torch.randn(2, 8, hidden, device=weight.device, dtype=weight.dtype)
    inputs = {name: probe_input(hf_block, name, 2, 8).to(weight.device) for name in block.spec.block_inputs}
    was_training = hf_block.training
    hf_block.eval()
    block.eval()
    with torch.no_grad():
        ref, out = hf_block(x, **inputs), block(x, **inputs)
    hf_block.train(was_training)
    block.train(was_training)
    if isinstance(ref, tuple) != isinstance(out, tuple):
        raise Unrecognized(f"{type(hf_block).__name__} returns {type(ref).__name__}, not what automoe's block returns")
    ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
    tolerance = 1e-4 if weight.dtype == torch.float32 else 3e-2
    error = ((ref.float() - out.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    if not error <= tolerance:
        raise Unrecognized(
            f"{type(hf_block).__name__} computes something else than its structure suggests "
            f"(relative difference {error:.2e} on a probe)"
        )


def optimize_model(model: nn.Module, options: AutoMoEOptions) -> nn.Module:
    """Replace every recognised MoE block; warn once, naming the family and why, for what stays HF."""
    if not options.enabled:
        return model
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    family = getattr(model.config, "model_type", type(model).__name__)
    verified: dict[type, str | None] = {}
    problems: dict[str, int] = {}
    kept: dict[str, int] = {}
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, MoEBlock) or find_experts(module) is None:
            continue
        try:
            spec = block_spec(module, config)
            options = check_backend(spec, options, getattr(module, spec.experts_attr).down_proj.dtype)
            block = build_block(module, spec, options)
            if family not in NAMED_FAMILIES:
                if type(module) not in verified:
                    verified[type(module)] = _probe_reason(module, block, options)
                if verified[type(module)]:
                    raise Unrecognized(verified[type(module)])
        except Unrecognized as why:
            problems[str(why)] = problems.get(str(why), 0) + 1
            continue
        model.set_submodule(name, block)
        replaced += 1
        for part in kept_parts(module, spec):
            kept[part] = kept.get(part, 0) + 1
    notes = []
    if problems:
        reasons = "; ".join(f"{why} ({n} block(s))" for why, n in problems.items())
        notes.append(f"{sum(problems.values())} MoE block(s) left as plain transformers, {replaced} accelerated. "
                     f"Why: {reasons}.")
    if kept:
        parts = "; ".join(f"{part} ({n} block(s))" for part, n in kept.items())
        notes.append(f"{replaced} MoE block(s) accelerated, with parts that run transformers' own code on the torch "
                     f"path (no automoe rule reproduces them, so they have no fused kernel): {parts}.")
    if not problems and replaced == 0 and is_moe_config(config):
        notes.append("a mixture-of-experts model, but its MoE blocks do not hold fused experts "
                     "(gate_up_proj/down_proj) that automoe recognises; loaded as plain transformers, not accelerated.")
    for note in notes:
        warnings.warn(f"automoe: {family}: {note}", AutoMoEWarning, stacklevel=3)
    if replaced:  # a model automoe does not accelerate stays plain transformers, kernels and attention included
        apply_kernels(model, options)
        logger.info(summary(model))
    return model


def kept_parts(hf_block: nn.Module, spec: BlockSpec) -> list[str]:
    """The parts of an accelerated block that run HF's code rather than automoe's (said once, at load)."""
    parts = []
    if spec.router is None:
        parts.append(f"router {type(getattr(hf_block, spec.router_attr)).__name__}")
    if spec.experts.activation == "hf_gate":
        parts.append(f"gate activation {type(getattr(hf_block, spec.experts_attr)).__name__}._apply_gate")
    return parts


def _probe_reason(hf_block: nn.Module, block: MoEBlock, options: AutoMoEOptions) -> str | None:
    """Why the block cannot be accelerated, or None. A block on the meta device (every distributed load builds
    there) is checked on a CPU twin of the HF block with random tensors, built into automoe's block the same way."""
    weight = getattr(block, block.spec.experts_attr).down_proj
    if weight.device.type == "meta":
        hf_block = cpu_twin(hf_block, torch.float32, seed=0)
        block = build_block(hf_block, block.spec, options)
    try:
        verify_block(hf_block, block)
    except Unrecognized as why:
        return str(why)
    return None

