"""Tiny random configs of v5 MoE families, small enough for CPU tests; dims keep grouped_mm's 16-byte rows."""

from __future__ import annotations

import transformers

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, tuple[str, dict]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48,
             norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.01),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48,
             shared_expert_intermediate_size=24, norm_topk_prob=False, output_router_logits=True),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, output_router_logits=True),
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16, output_router_logits=True),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48,
             n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
             q_lora_rank=16, kv_lora_rank=16, num_key_value_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=8, num_hidden_layers=3),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, output_router_logits=True,
             layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48,
             n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3,
             partial_rotary_factor=0.5),
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, output_router_logits=True),
    ),
    "phimoe": (
        "PhimoeConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, output_router_logits=True),
    ),
    "flex_olmo": (
        "FlexOlmoConfig",
        dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16, output_router_logits=True),
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        dict(num_experts=8, moe_topk=2, intermediate_size=16, output_router_logits=True),
    ),
    "dots1": (
        "Dots1Config",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48,
             n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3),
    ),
}


def make_config(family: str, **overrides):
    cls_name, extra = FAMILIES[family]
    kwargs = {**COMMON, **extra, **overrides}
    return getattr(transformers, cls_name)(**kwargs)

FAMILIES["nemotron_h"] = (
    "NemotronHConfig",
    dict(layers_block_type=["mamba", "moe", "attention", "moe"], num_hidden_layers=4, n_routed_experts=8,
         num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24,
         intermediate_size=48, n_group=1, topk_group=1, routed_scaling_factor=2.5, mamba_num_heads=4,
         mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=16, use_mamba_kernels=False,
         mlp_hidden_act="relu2", output_router_logits=True),
)
FAMILIES["nemotron_h_latent"] = (
    "NemotronHConfig", dict(FAMILIES["nemotron_h"][1], moe_latent_size=16),
)
