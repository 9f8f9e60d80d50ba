"""The benchmark workloads of shared/BENCHMARKS.md as configs, and the model FLOPs per token used for MFU."""

from __future__ import annotations

import importlib.util

import torch
import transformers
from torch import nn

QWEN3_30B_A3B = dict(
    hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144, vocab_size=151936,
    num_hidden_layers=48, tie_word_embeddings=False, norm_topk_prob=True, rms_norm_eps=1e-6,
    rope_theta=1_000_000.0, router_aux_loss_coef=0.001, max_position_embeddings=262144,
)

# NVIDIA-Nemotron-3-Nano-30B-A3B (hybrid Mamba2 / attention / MoE, relu2 experts without a gate). Shapes from
# NVIDIA's Megatron-Bridge `Nemotron3NanoProvider` (src/megatron/bridge/models/nemotronh/nemotron_h_provider.py):
# hybrid pattern MEMEM*EMEMEM*E... (52 layers), hidden 2688, 32 heads / 2 KV heads of 128, Mamba2 64 heads of 64
# with state 128, 128 routed experts of 1856 + one shared expert of 3712, top-6 sigmoid routing scaled by 2.5;
# vocab 131072 and 8 Mamba groups as in its HF config.json. The benchmark keeps the first 7 layers, "MEMEM*E":
# 3 Mamba2, 3 MoE and 1 attention layer (~4.6B parameters), which trains with AdamW on one H200.
NEMOTRON_3_NANO = dict(
    hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", hidden_size=2688,
    num_attention_heads=32, num_key_value_heads=2, head_dim=128, mamba_num_heads=64, mamba_head_dim=64,
    ssm_state_size=128, n_groups=8, conv_kernel=4, n_routed_experts=128, num_experts_per_tok=6,
    moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, intermediate_size=1856,
    routed_scaling_factor=2.5, n_group=1, topk_group=1, norm_topk_prob=True, mlp_hidden_act="relu2",
    vocab_size=131072, tie_word_embeddings=False, max_position_embeddings=262144,
)

WORKLOADS: dict[str, tuple[str, dict]] = {
    "nemotron-3-nano": ("NemotronHConfig", {**NEMOTRON_3_NANO, "hybrid_override_pattern": "MEMEM*E"}),
    # CPU-sized Nemotron-H, for the harness's own tests
    "nemotron-tiny": ("NemotronHConfig", {**NEMOTRON_3_NANO, "hybrid_override_pattern": "MEM*E", "hidden_size": 64,
                                          "num_attention_heads": 4, "head_dim": 16, "mamba_num_heads": 4,
                                          "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 2,
                                          "n_routed_experts": 8, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 64,
                                          "intermediate_size": 32, "vocab_size": 256, "max_position_embeddings": 4096}),
    "qwen3-30b-a3b-l8": ("Qwen3MoeConfig", {**QWEN3_30B_A3B, "num_hidden_layers": 8}),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", QWEN3_30B_A3B),
    # CPU-sized, for the harness's own tests
    "tiny": ("Qwen3MoeConfig", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96, vocab_size=256,
        num_hidden_layers=2, tie_word_embeddings=False, norm_topk_prob=True, max_position_embeddings=4096,
    )),
}


def make_config(workload: str, layers: int | None = None):
    if workload not in WORKLOADS:
        raise ValueError(f"automoe bench: unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}.")
    cls_name, kwargs = WORKLOADS[workload]
    if layers is not None and "hybrid_override_pattern" in kwargs:  # a hybrid model keeps its first layers
        kwargs = {**kwargs, "hybrid_override_pattern": kwargs["hybrid_override_pattern"][:layers]}
    elif layers is not None:
        kwargs = {**kwargs, "num_hidden_layers": layers}
    return getattr(transformers, cls_name)(**kwargs)


def mamba_kernels(config) -> str | None:
    """For a model with Mamba2 layers, which implementation HF's mixer runs: the mamba-ssm / causal-conv1d
    kernels where both import, else HF's torch path. None for a model without Mamba layers."""
    layer_types = set(getattr(config, "layers_block_type", None) or ())
    if not layer_types & {"mamba", "linear_attention"}:  # transformers 5.24 names NemotronH's Mamba2 layers so
        return None
    found = [name for name in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(name) is not None]
    if len(found) == 2:
        return "mamba-ssm + causal-conv1d kernels"
    return f"HF's torch path (installed: {', '.join(found) or 'neither mamba-ssm nor causal-conv1d'})"


def top_k(config) -> int:
    """Experts each token runs through; 1 for a dense model (no expert count)."""
    for key in ("num_experts_per_tok", "moe_topk", "top_k"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    if not any(isinstance(getattr(config, k, None), int)
               for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        return 1
    raise ValueError(f"{type(config).__name__} names no top-k")


def active_matmul_params(model: nn.Module, k: int) -> float:
    """Weights one token multiplies by: every Linear (lm_head included), routers, and k/E of each expert stack."""
    total = 0.0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel()
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
            stack = module.gate_up_proj.numel() + module.down_proj.numel()
            total += stack * k / module.gate_up_proj.shape[0]
        elif "Router" in type(module).__name__ and isinstance(getattr(module, "weight", None), torch.Tensor):
            total += module.weight.numel()
    return total


def flops_per_token(config, seq: int) -> float:
    """6 x active matmul parameters + causal attention (fwd + bwd: 6 x layers x heads x head_dim x seq)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    attention = 6 * text.num_hidden_layers * text.num_attention_heads * head_dim * seq
    return 6 * active_matmul_params(model, top_k(text)) + attention
