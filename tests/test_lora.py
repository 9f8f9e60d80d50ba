"""LoRA on fused experts computed on the routed tokens, held to HF + peft (eager experts, fp32 CPU)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_configs import make_config
from transformers import AutoModelForCausalLM

from automoe.families.recognize import experts_spec
from automoe.kernels.lora_experts import routed_lora_experts, routed_lora_experts_reference
from automoe.moe.lora import expert_adapters

FAMILIES = ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss", "qwen2_moe"]
# an expert intermediate size with 2I != H, so a projection adapted the wrong way round cannot match by shape
INTERMEDIATE_KEY = {"qwen3_moe": "moe_intermediate_size", "qwen2_moe": "moe_intermediate_size",
                    "deepseek_v3": "moe_intermediate_size"}
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def lora_config(r: int = 4, **kwargs) -> LoraConfig:
    # init_lora_weights=False: B is random too (peft's default zero B would give A no gradient to compare)
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["o_proj"], target_parameters=EXPERT_TARGETS,
                      init_lora_weights=False, **kwargs)


def hf_peft_model(family: str, config: LoraConfig | None = None):
    torch.manual_seed(0)
    hf_config = make_config(family, **{INTERMEDIATE_KEY.get(family, "intermediate_size"): 24})
    model = AutoModelForCausalLM.from_config(hf_config, experts_implementation="eager", dtype=torch.float32)
    return get_peft_model(model, config or lora_config())


def every_expert_routing(num_tokens: int, top_k: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t picks experts (t*k + j) % E: distinct per token, every expert reached when T*k >= E; random
    softmax weights."""
    ids = (torch.arange(num_tokens)[:, None] * top_k + torch.arange(top_k)) % num_experts
    weights = torch.randn(num_tokens, top_k).softmax(-1)
    return ids, weights


def moe_experts(peft_model):
    return [layer.mlp.experts for layer in peft_model.base_model.model.model.layers if hasattr(layer.mlp, "experts")]


def adapter_params(wrapper) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in wrapper.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["function", "reference"])
def test_routed_lora_matches_hf_peft(family, path):
    """One MoE layer's experts: automoe's routed-token LoRA against peft's W + B·A on HF's eager experts, output
    and the gradient of every adapter tensor, of x and of the routing weights; every expert's adapter is trained."""
    model = hf_peft_model(family)
    wrapper = moe_experts(model)[-1]
    base = wrapper.get_base_layer()
    spec = experts_spec(base)
    torch.manual_seed(1)
    x = torch.randn(12, spec.hidden_size, requires_grad=True)
    ids, weights = every_expert_routing(12, 2, spec.num_experts)
    weights.requires_grad_(True)
    probe = torch.randn(12, spec.hidden_size)

    ref = wrapper(x, ids, weights)
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, weights, *adapter_params(wrapper).values()])

    experts, gate_up, down = expert_adapters(wrapper, spec, torch.float32)
    assert experts is base and gate_up is not None and down is not None
    biases = (experts.gate_up_proj_bias, experts.down_proj_bias) if spec.has_bias else (None, None)
    args = (x, ids, weights, experts.gate_up_proj, experts.down_proj, biases, gate_up, down, spec,
            getattr(experts, "act_fn", None))
    out = routed_lora_experts(*args, mode="torch") if path == "function" else routed_lora_experts_reference(*args)
    grads = torch.autograd.grad((out * probe).sum(), [x, weights, *adapter_params(wrapper).values()])

    assert rel(out, ref) < 1e-4
    names = ["x", "routing weights", *adapter_params(wrapper)]
    for name, grad, ref_grad in zip(names, grads, ref_grads, strict=True):
        assert rel(grad, ref_grad) < 1e-3, f"{family}: gradient of {name}"
    for name, grad in zip(names[2:], grads[2:], strict=True):
        per_expert = grad.view(spec.num_experts, -1, grad.shape[-1]) if "lora_A" in name else (
            grad.view(grad.shape[0], -1, spec.num_experts).transpose(0, 2))
        assert (per_expert.flatten(1).abs().amax(1) > 0).all(), f"{family}: an expert of {name} got no gradient"


def test_frozen_base_gets_no_gradient_and_ranks_pad():
    """With the base frozen (as peft leaves it) the Function returns no base-weight gradient; a rank that is not
    a multiple of 8 is zero-padded and computes the same."""
    model = hf_peft_model("qwen3_moe", lora_config(r=3))
    wrapper = moe_experts(model)[-1]
    spec = experts_spec(wrapper.get_base_layer())
    experts, gate_up, down = expert_adapters(wrapper, spec, torch.float32)
    assert gate_up[0].shape[-1] == 8 and down[1].shape[1] == 8
    assert not experts.gate_up_proj.requires_grad and not experts.down_proj.requires_grad
    x = torch.randn(10, spec.hidden_size)
    ids, weights = every_expert_routing(10, 2, spec.num_experts)
    with torch.no_grad():
        ref = wrapper(x, ids, weights)
    out = routed_lora_experts(x, ids, weights, experts.gate_up_proj, experts.down_proj, (None, None), gate_up, down,
                              spec, experts.act_fn, mode="torch")
    assert rel(out, ref) < 1e-4
    out.sum().backward()
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None
    assert all(p.grad is not None for p in adapter_params(wrapper).values())


def test_disabled_merged_and_inactive_adapters_add_nothing():
    """peft's own switches decide: disable_adapter(), merged weights and no active adapter give no factors."""
    model = hf_peft_model("qwen3_moe")
    wrapper = moe_experts(model)[-1]
    spec = experts_spec(wrapper.get_base_layer())
    with model.disable_adapter():
        assert expert_adapters(wrapper, spec, torch.float32)[1:] == (None, None)
    model.merge_adapter()
    assert expert_adapters(wrapper, spec, torch.float32)[1:] == (None, None)
    model.unmerge_adapter()
    assert all(f is not None for f in expert_adapters(wrapper, spec, torch.float32)[1:])


def test_two_active_adapters_sum():
    """Two adapters active at once (peft sums their deltas) give the concatenated-rank factors' output."""
    model = hf_peft_model("mixtral")
    model.add_adapter("second", lora_config(r=2))
    model.base_model.set_adapter(["default", "second"])
    wrapper = moe_experts(model)[-1]
    spec = experts_spec(wrapper.get_base_layer())
    experts, gate_up, down = expert_adapters(wrapper, spec, torch.float32)
    x = torch.randn(10, spec.hidden_size)
    ids, weights = every_expert_routing(10, 2, spec.num_experts)
    out = routed_lora_experts(x, ids, weights, experts.gate_up_proj, experts.down_proj, (None, None), gate_up, down,
                              spec, experts.act_fn, mode="torch")
    assert rel(out, wrapper(x, ids, weights)) < 1e-4


def test_wrong_orientation_is_named():
    """Adapters made for the other layout (GPT-OSS experts that did not declare is_transposed) are refused with
    the reason instead of computing something else."""
    model = hf_peft_model("gpt_oss")
    wrapper = moe_experts(model)[-1]
    spec = experts_spec(wrapper.get_base_layer())
    wrong = type(spec)(**{**spec.__dict__, "transposed": False, "hidden_size": 24, "intermediate_size": 16})
    with pytest.raises(ValueError, match="is_transposed"):
        expert_adapters(wrapper, wrong, torch.float32)
