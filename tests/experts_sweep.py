"""Tiny configs of every model type whose experts transformers declares with `@use_experts_implementation`,
built generically from each config class's defaults (sizes shrunk, per-layer lists cut to the first layers)."""

from __future__ import annotations

import pathlib

import transformers.models
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

NUM_LAYERS = 3
EXPERTS, TOP_K = 8, 2

# every size-like key some family's config uses, with a tiny value that keeps grouped_mm's 16-byte rows in fp32
SIZES = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, dense_intermediate_size=48,
    shared_expert_intermediate_size=24, moe_shared_expert_intermediate_size=24, shared_experts_intermediate_size=24,
    prefix_dense_intermediate_size=48, moe_hidden_size=32, router_hidden_size=16, moe_latent_size=None,
    num_attention_heads=4, num_key_value_heads=4, head_dim=8, swa_num_attention_heads=4, swa_head_dim=8,
    max_position_embeddings=64, kv_lora_rank=16, q_lora_rank=16, o_lora_rank=16, o_groups=2,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, index_head_dim=16, index_n_heads=2, index_topk=4,
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_head_dim=8, linear_num_heads=4, mamba_num_heads=4, mamba_head_dim=8, mamba_n_heads=4, mamba_d_head=8,
    mamba_d_state=8, mamba_dt_rank=4, mamba_chunk_size=16, ssm_state_size=8, chunk_size=16, n_groups=2,
    mamba_n_groups=1, time_step_rank=4, hidden_size_per_layer_input=8, vocab_size_per_layer_input=128,
    layer_group_size=3, sliding_window=16, num_nextn_predict_layers=0, first_k_dense_replace=1, num_dense_layers=1,
    moe_layer_start_index=1, n_layers_per_attn_res_block=1, moe_num_shared_experts=1, n_shared_experts=1,
    num_shared_experts=1, moe_shared_experts=1,
    num_experts=EXPERTS, num_local_experts=EXPERTS, n_routed_experts=EXPERTS, moe_num_experts=EXPERTS,
    num_experts_per_tok=TOP_K, num_experts_per_token=TOP_K, moe_topk=TOP_K, moe_k=TOP_K, top_k_experts=TOP_K,
    output_router_logits=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    use_mamba_kernels=False,
)

# what the generic shrinking cannot tell: sizes a config validates against each other, layer patterns by period
OVERRIDES = dict(
    granitemoehybrid=dict(mamba_n_heads=8, mamba_d_head=8,
                          layer_types=["linear_attention", "full_attention", "linear_attention"]),
    lfm2_moe=dict(layer_types=["conv", "full_attention", "conv"]),
    gemma4_text=dict(enable_moe_block=True),
    dots3_note_text=dict(swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=16, swa_kv_lora_rank=16,
                         swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=8),
    # its partial_rotary_factor 0.334 leaves 4 rotary dims of 12; its sliding layers double the kv heads
    mimo_v2_flash=dict(head_dim=12, num_key_value_heads=2),
    qwen4_exp_text=dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
                        indexer_compress_ratio=2, ngram_vocab_size_base=128, ple_embed_dim=8, hc_lowrank=8),
    zaya=dict(num_experts_per_tok=1),
    jamba=dict(attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1),
)


def experts_model_types() -> list[str]:
    """Model types whose modeling file decorates an experts class with `@use_experts_implementation`."""
    root = pathlib.Path(transformers.models.__file__).parent
    return sorted(
        d.name for d in root.iterdir()
        if (d / f"modeling_{d.name}.py").is_file()
        and "@use_experts_implementation" in (d / f"modeling_{d.name}.py").read_text()
    )


def has_causal_lm(model_type: str) -> bool:
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _cut(values: list, n: int) -> list:
    """The first n layers of a per-layer list, the last made sparse (an MLP list) or full attention (a mixer
    list) when none of the first n is."""
    out = list(values[:n])
    kinds = set(map(str, values))
    # attention over every token, by any name (full_attention, indexed_attention, qwen_sparse_attention, ...)
    full = sorted(k for k in kinds if k.endswith("attention") and not k.startswith(("linear", "sliding")))
    for wanted in (("sparse", "moe", "hash_moe"), ("full_attention", "attention", *full)):
        kind = next((k for k in wanted if k in kinds), None)
        if kind is not None and kind not in out:
            out[-1] = kind
    return out


def tiny_config(model_type: str, **overrides):
    cls = CONFIG_MAPPING[model_type]
    text = getattr(cls, "sub_configs", {}).get("text_config")
    if text is not None and has_causal_lm(text.model_type):  # a multimodal family: its language model (gemma4_text)
        return tiny_config(text.model_type, **overrides)
    defaults = cls().to_dict()
    kwargs = {k: v for k, v in SIZES.items() if k in defaults}
    layers = defaults.get("num_hidden_layers")
    if layers is not None:
        kwargs["num_hidden_layers"] = NUM_LAYERS
        for key, value in defaults.items():
            if isinstance(value, list) and len(value) == layers and key not in kwargs:
                kwargs[key] = _cut(value, NUM_LAYERS)
    if (defaults.get("n_group") or 1) > 1:
        kwargs.update(n_group=2, topk_group=1)
    if (defaults.get("num_expert_group") or 1) > 1:
        kwargs.update(num_expert_group=2, topk_group=1)
    kwargs.update(OVERRIDES.get(model_type, {}), **overrides)
    return cls(**kwargs)
