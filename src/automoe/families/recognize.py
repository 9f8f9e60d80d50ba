"""Recognise an HF v5 MoE block by its structure and describe it as a BlockSpec.

Experts declare their layout through transformers' `use_experts_implementation` flags; routers are
matched by running a small CPU twin of the HF router beside each candidate RouterSpec on random weights
and inputs. Nothing here depends on a family's name except the overrides in `automoe.families`.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from dataclasses import replace

import torch
from torch import nn
from transformers.integrations.moe import _default_apply_gate

from ..moe.experts import gated_activation
from ..moe.router import Router
from ..moe.spec import SHARED_COMBINES, BlockSpec, ExpertsSpec, RouterSpec
from . import BLOCK_OVERRIDES
from .activation import identify_activation


class Unrecognized(Exception):
    """The block does not follow a layout automoe can run; the message says what differs."""


def find_experts(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The child holding fused 3D expert tensors (gate_up_proj, or up_proj without a gate), if the block has one."""
    for name, child in block.named_children():
        first = getattr(child, "gate_up_proj", None)
        if first is None:
            first = getattr(child, "up_proj", None)
        if isinstance(first, torch.Tensor) and first.dim() == 3 and hasattr(child, "down_proj"):
            return name, child
    return None


def experts_spec(experts: nn.Module) -> ExpertsSpec:
    if not hasattr(experts, "is_transposed"):
        raise Unrecognized(
            f"{type(experts).__name__} does not declare its layout through transformers' use_experts_implementation"
        )
    if getattr(experts, "has_post_expert_norm", False):
        raise Unrecognized(f"{type(experts).__name__} applies a norm after each expert")
    has_gate = getattr(experts, "has_gate", True)
    first = experts.gate_up_proj if has_gate else experts.up_proj
    num_experts = first.shape[0]
    hidden, width = first.shape[1:] if experts.is_transposed else reversed(first.shape[1:])
    spec = ExpertsSpec(
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=width // 2 if has_gate else width,
        has_gate=has_gate,
        interleaved=not experts.is_concatenated,
        transposed=experts.is_transposed,
        has_bias=experts.has_bias,
    )
    act_fn = getattr(experts, "act_fn", None)
    if not has_gate or type(experts)._apply_gate is _default_apply_gate:
        if not callable(act_fn):  # a module, or a function (LFM2-MoE's F.silu)
            raise Unrecognized(f"{type(experts).__name__} has no act_fn")
        return replace(spec, act_name=identify_activation(act_fn))
    # a custom _apply_gate is matched by what it computes: act(gate) * up (e.g. in fp32, rounded once, as automoe
    # computes it anyway) or GPT-OSS's clamped SwiGLU
    candidates = []
    if callable(act_fn):
        candidates.append(replace(spec, act_name=identify_activation(act_fn)))
    if hasattr(experts, "alpha") and hasattr(experts, "limit"):
        candidates.append(
            replace(spec, activation="clamped_swiglu", swiglu_alpha=experts.alpha, swiglu_limit=experts.limit)
        )
    probe = torch.randn(8, 2 * spec.intermediate_size, generator=torch.Generator().manual_seed(0), device="cpu") * 10
    with torch.no_grad():
        got = experts._apply_gate(probe)
        for candidate in candidates:
            if torch.allclose(got, gated_activation(probe, candidate, act_fn), rtol=1e-5, atol=1e-6):
                return candidate
    # no rule of automoe's: HF's own _apply_gate runs on the torch path (moe.experts.HFGate), which cannot carry
    # tensors the gate's modules hold
    if any(True for child in experts.children() for _ in itertools.chain(child.parameters(), child.buffers())):
        raise Unrecognized(f"{type(experts).__name__} has a custom gate activation whose modules hold tensors")
    return replace(spec, activation="hf_gate")


def _router_candidates(router: nn.Module, config, num_experts: int, top_k: int) -> list[RouterSpec]:
    has_bias = isinstance(getattr(router, "bias", None), torch.Tensor)
    has_correction = isinstance(getattr(router, "e_score_correction_bias", None), torch.Tensor)
    base = dict(num_experts=num_experts, top_k=top_k, has_bias=has_bias, has_correction_bias=has_correction)
    dtype_flags = [
        dict(logits_in_fp32=a, weights_in_fp32=b) for a, b in itertools.product((False, True), repeat=2)
    ]
    # sigmoid scores, with or without a correction bias (Flint's has none)
    families = [
        dict(
            score_func="sigmoid",
            n_group=getattr(config, "n_group", None) or 1,
            topk_group=getattr(config, "topk_group", None) or 1,
            routed_scaling_factor=scale,
            norm_topk_prob=norm,
            renorm_eps=eps,
        )
        for norm in (True, False)
        for eps in (1e-20, 0.0)
        # the factor in the router, or (1.0) applied by the block to the experts' sum (BlockSpec)
        for scale in {float(getattr(config, "routed_scaling_factor", None) or 1.0), 1.0}
    ]
    if not has_correction:  # the softmax rules have no correction bias
        families += [dict(score_func="softmax", norm_topk_prob=norm) for norm in (True, False)]
        families.append(dict(score_func="topk_softmax"))
    return [RouterSpec(**base, **fam, **flags) for fam in families for flags in dtype_flags]


def cpu_twin(module: nn.Module, dtype: torch.dtype, seed: int) -> nn.Module:
    """A CPU copy of a small module with fresh random floating tensors (works for meta-device modules too); integer
    tensors (DeepSeek-V4's token-to-expert table) keep their values, or are zeros where those are on meta."""
    twin = copy.deepcopy(module).to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(seed)
    originals = itertools.chain(module.parameters(), module.buffers())
    with torch.no_grad():
        for tensor, original in zip(itertools.chain(twin.parameters(), twin.buffers()), originals, strict=True):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen, device="cpu") * 0.5)
            elif original.device.type == "meta":
                tensor.zero_()
            else:
                tensor.copy_(original)
    return twin


def build_router(hf_router: nn.Module, spec: RouterSpec, balanced: bool = False) -> Router:
    from ..moe.adopt import adopt_tensors, hf_compatible_class

    router = hf_compatible_class(Router, type(hf_router))(spec, balanced)
    names = ["weight"] + ["bias"] * spec.has_bias + ["e_score_correction_bias"] * spec.has_correction_bias
    adopt_tensors(router, hf_router, names)
    return router


def router_spec(router: nn.Module, config, num_experts: int) -> RouterSpec:
    """The candidate that reproduces the HF router: equal routing in fp32, then in bf16 the same dtypes and
    ids with the smallest weight error (so an algebraically equal but differently rounded rule loses)."""
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != num_experts:
        raise Unrecognized(f"router {type(router).__name__} has no [num_experts, hidden] weight")
    tensors = {name for name, _ in itertools.chain(router.named_parameters(), router.named_buffers())}
    if not tensors <= {"weight", "bias", "e_score_correction_bias"}:
        raise Unrecognized(f"router {type(router).__name__} holds tensors automoe's router does not: "
                           f"{sorted(tensors - {'weight', 'bias', 'e_score_correction_bias'})}")
    top_k = getattr(router, "top_k", None) or getattr(config, "num_experts_per_tok", None)
    if not top_k:
        raise Unrecognized(f"cannot tell top-k of router {type(router).__name__}")
    candidates = _router_candidates(router, config, num_experts, top_k)
    for dtype, seed in ((torch.float32, 0), (torch.bfloat16, 1)):
        twin = cpu_twin(router, dtype, seed)
        x = torch.randn(32, weight.shape[1], generator=torch.Generator().manual_seed(seed + 7), device="cpu").to(dtype)
        try:
            with torch.no_grad():
                ref = twin(x)
        except Exception as err:  # an HF router we cannot even run on CPU is not one we can match
            raise Unrecognized(f"router {type(router).__name__} could not be probed: {err}") from err
        if not (isinstance(ref, tuple) and len(ref) == 3):
            raise Unrecognized(f"router {type(router).__name__} does not return (logits, weights, ids)")
        errors = {c: _routing_error(ref, _run(twin, c, x)) for c in candidates}
        tolerance = 1e-4 if dtype == torch.float32 else float("inf")
        candidates = sorted((c for c in candidates if errors[c] <= tolerance), key=errors.__getitem__)
        if not candidates:
            raise Unrecognized(f"router {type(router).__name__} scores experts in a way automoe does not know")
    return candidates[0]


def scoring_weight(module: nn.Module, num_experts: int) -> torch.Tensor | None:
    """The [num_experts, hidden] weight that scores experts, the module's own or a submodule's (HunYuan's gate.wg,
    AFMoE's router.gate), or None."""
    for _, tensor in module.named_parameters():
        if tensor.dim() == 2 and tensor.shape[0] == num_experts:
            return tensor
    return None


def router_inputs(router: nn.Module, block_tensors: set[str], block_inputs: tuple[str, ...]) -> tuple[str, ...]:
    """What the HF router's forward takes after the hidden states, by parameter name: the block's own tensors (AFMoE's
    expert_bias, MiniMax-M2's e_score_correction_bias) or the block's inputs (DeepSeek-V4's input_ids)."""
    names = []
    for param in list(inspect.signature(router.forward).parameters.values())[1:]:
        if param.name in block_tensors or param.name in block_inputs:
            names.append(param.name)
        elif param.default is inspect.Parameter.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise Unrecognized(f"router {type(router).__name__} takes {param.name}, which its block does not hold")
    return tuple(names)


def block_inputs(block: nn.Module) -> tuple[str, ...]:
    """The keywords the HF block's forward takes after the hidden states; each needs a default (the decoder layer
    may leave it out) and a probe value (probe_input)."""
    names = []
    for param in list(inspect.signature(block.forward).parameters.values())[1:]:
        if param.default is inspect.Parameter.empty or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise Unrecognized(f"{type(block).__name__}.forward takes {param.name} besides the hidden states")
        probe_input(block, param.name, 1, 1)
        names.append(param.name)
    return tuple(names)


def probe_input(block: nn.Module, name: str, batch: int, seq: int) -> torch.Tensor:
    """A value of the block input `name` for the numerical checks: token ids (as DeepSeek-V4's hash router indexes
    its table by them) are 0 or 1, valid for any vocabulary; automoe knows no other kind of block input."""
    if not name.endswith("_ids"):
        raise Unrecognized(f"{type(block).__name__}.forward takes {name} besides the hidden states")
    return torch.randint(0, 2, (batch, seq), generator=torch.Generator().manual_seed(5), device="cpu")


def hf_router_batched(router: nn.Module, args: list[torch.Tensor], num_experts: int, why: str) -> bool:
    """Whether the HF router, kept as it is, takes [batch, seq, hidden] (True) or [tokens, hidden] (False): the form
    on which a CPU twin returns (logits, weights, ids) with [tokens, k] weights and integer ids. `args`: probe values
    of what it takes after the hidden states, for 2 x 4 tokens."""
    hidden = scoring_weight(router, num_experts).shape[1]
    twin = cpu_twin(router, torch.float32, seed=0)
    x = torch.randn(2, 4, hidden, generator=torch.Generator().manual_seed(3), device="cpu")
    for batched in (False, True):
        try:
            with torch.no_grad():
                out = twin(x if batched else x.reshape(8, hidden), *args)
        except Exception:  # a router that cannot take this form of the hidden states takes the other
            continue
        if (isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out)
                and out[1].dim() == 2 and out[1].shape == out[2].shape and out[1].shape[0] == 8
                and not out[2].is_floating_point()):
            return batched
    raise Unrecognized(f"{why}; nor does it run as HF's own module: it returns no (logits, [tokens, k] weights, ids)")


def _run(twin: nn.Module, spec: RouterSpec, x: torch.Tensor) -> tuple | None:
    try:
        with torch.no_grad():
            return build_router(twin, spec)(x)
    except Exception:  # a candidate that cannot run on this router is simply not a match
        return None


def _routing_error(ref: tuple, out: tuple | None) -> float:
    """Relative error of the top-k weights; inf when ids, dtypes or logits differ."""
    if out is None or any(a.dtype != b.dtype or a.shape != b.shape for a, b in zip(ref, out, strict=True)):
        return float("inf")
    (ref_logits, ref_w, ref_ids), (logits, w, ids) = ref, out
    ref_order, order = ref_ids.argsort(dim=-1), ids.argsort(dim=-1)
    if not torch.equal(ref_ids.gather(1, ref_order), ids.gather(1, order)):
        return float("inf")
    if not torch.allclose(ref_logits.float(), logits.float(), rtol=1e-5, atol=1e-6):
        return float("inf")
    diff = ref_w.gather(1, ref_order).float() - w.gather(1, order).float()
    return (diff.norm() / ref_w.float().norm().clamp_min(1e-30)).item()


def block_spec(block: nn.Module, config) -> BlockSpec:
    found = find_experts(block)
    if found is None:
        raise Unrecognized(f"{type(block).__name__} has no fused experts module")
    experts_attr, experts = found
    exp = experts_spec(experts)
    router_attr = shared_attr = shared_gate_attr = latent_in_attr = latent_out_attr = post_norm_attr = None
    for name, child in block.named_children():
        if name == experts_attr or not list(child.parameters()) + list(child.buffers()):
            continue  # parameter-free children (HF's nn.Identity stand-ins) are kept and not called
        weight = getattr(child, "weight", None)
        if isinstance(child, nn.Linear) and child.out_features == 1 and "shared" in name:
            shared_gate_attr = name
        elif isinstance(child, nn.Linear) and "latent" in name and child.out_features == exp.hidden_size:
            latent_in_attr = name
        elif isinstance(child, nn.Linear) and "latent" in name and child.in_features == exp.hidden_size:
            latent_out_attr = name
        elif name.startswith("post") and "norm" in name and isinstance(weight, torch.Tensor) and weight.dim() == 1:
            post_norm_attr = name
        elif "shared" in name and shared_attr is None:
            shared_attr = name
        elif router_attr is None and scoring_weight(child, exp.num_experts) is not None:
            router_attr = name
        else:
            raise Unrecognized(
                f"{type(block).__name__} has a part automoe does not know: {name} ({type(child).__name__})"
            )
    if router_attr is None:
        raise Unrecognized(f"{type(block).__name__} has no router with a [{exp.num_experts}, hidden] weight")
    if shared_gate_attr and not shared_attr:
        raise Unrecognized(f"{type(block).__name__} has a shared-expert gate but no shared expert")
    if (latent_in_attr is None) != (latent_out_attr is None):
        raise Unrecognized(f"{type(block).__name__} projects into the experts' latent width but not back")
    router = getattr(block, router_attr)
    inputs = block_inputs(block)
    own = dict(itertools.chain(block.named_parameters(recurse=False), block.named_buffers(recurse=False)))
    router_args = router_inputs(router, set(own), inputs)
    if set(own) - set(router_args):
        raise Unrecognized(f"{type(block).__name__} holds tensors of its own outside router and experts: "
                           f"{sorted(set(own) - set(router_args))}")
    try:
        if router_args:
            raise Unrecognized(f"router {type(router).__name__} takes {', '.join(router_args)} from its block")
        rspec, batched = router_spec(router, config, exp.num_experts), False
    except Unrecognized as why:  # no rule of automoe's: the HF router runs as it is
        rspec = None
        gen = torch.Generator().manual_seed(4)
        args = [probe_input(block, n, 2, 4) if n in inputs else torch.randn(own[n].shape, generator=gen, device="cpu")
                for n in router_args]
        batched = hf_router_batched(router, args, exp.num_experts, str(why))
    combine = getattr(block, "shared_expert_combination_strategy", "sum")
    if combine not in SHARED_COMBINES:
        raise Unrecognized(f"{type(block).__name__} combines routed and shared experts by {combine!r}")
    spec = BlockSpec(
        router=rspec,
        experts=exp,
        router_attr=router_attr,
        experts_attr=experts_attr,
        shared_attr=shared_attr,
        shared_gate_attr=shared_gate_attr,
        latent_in_attr=latent_in_attr,
        latent_out_attr=latent_out_attr,
        jitter_noise=float(getattr(block, "jitter_noise", 0.0) or getattr(block, "input_jitter_noise", 0.0) or 0.0),
        router_args=router_args,
        block_inputs=inputs,
        router_batched=batched,
        post_norm_attr=post_norm_attr,
        shared_combine=combine,
    )
    block_scale = getattr(block, "routed_scaling_factor", None)
    if isinstance(block_scale, float | int) and (rspec is None or rspec.routed_scaling_factor == 1.0):
        spec = replace(spec, routed_output_scale=float(block_scale))
    return replace(spec, **BLOCK_OVERRIDES.get(config.model_type, {}))
