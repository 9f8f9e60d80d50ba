"""bf16 parity of automoe against HF (experts_implementation="eager") on the GPU, at real layer shapes.

Usage: python benchmarks/gpu_parity.py [--out results.json]
Prints, per family, the relative error of loss, logits and a sample of gradients, and the pass/fail
against the bf16 tolerance (loss rel. error < 1e-2).
"""

from __future__ import annotations

import argparse
import json

import torch
import transformers
from transformers import AutoModelForCausalLM

from automoe import AutoMoEOptions, optimize_model
from automoe.moe.block import MoEBlock

SHAPES = {
    # Qwen3-30B-A3B's layer shape, 2 layers
    "qwen3_moe": transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
        norm_topk_prob=True, tie_word_embeddings=False, output_router_logits=True,
    ),
    # DeepSeek-V3's block (MLA, sigmoid grouped router with bias, shared expert, first layer dense), scaled down
    "deepseek_v3": transformers.DeepseekV3Config(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, num_experts_per_tok=8, moe_intermediate_size=1024, intermediate_size=8192,
        n_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=1,
        q_lora_rank=768, kv_lora_rank=256, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        tie_word_embeddings=False,
    ),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(family: str, config, seq: int, device: str) -> dict:
    torch.manual_seed(0)
    # built straight on the device (a CPU build of these shapes takes minutes); automoe's swap runs after, since
    # its recogniser probes on CPU and must not run under a CUDA default device
    with torch.device(device):
        ref = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, experts_implementation="eager")
        ours = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    ours = optimize_model(ours, AutoMoEOptions())
    with torch.no_grad():
        for module in ref.modules():  # the e_score_correction_bias starts at zero; make it matter
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.01)
    ours.load_state_dict(ref.state_dict())
    assert any(isinstance(m, MoEBlock) for m in ours.modules())
    ids = torch.randint(0, config.vocab_size, (1, seq), device=device)
    result = {"family": family, "seq": seq}
    outs = []
    for model in (ref, ours):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out)
    result["loss_ref"], result["loss_automoe"] = outs[0].loss.item(), outs[1].loss.item()
    result["loss_rel_err"] = rel(outs[1].loss, outs[0].loss)
    result["logits_rel_err"] = rel(outs[1].logits, outs[0].logits)
    ref_params = dict(ref.named_parameters())
    grads = {
        name: rel(p.grad, ref_params[name].grad)
        for name, p in ours.named_parameters()
        if ref_params[name].grad is not None and any(k in name for k in ("experts", "gate", "embed", "q_proj", "kv_a"))
    }
    result["grad_rel_err_max"] = max(grads.values())
    result["grad_rel_err_median"] = sorted(grads.values())[len(grads) // 2]
    result["pass"] = result["loss_rel_err"] < 1e-2
    del ref, ours, outs
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--out")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    results = []
    for family, config in SHAPES.items():
        r = check(family, config, args.seq, args.device)
        results.append(r)
        print(
            f"{r['family']:12s} seq {r['seq']}: loss {r['loss_ref']:.5f} vs {r['loss_automoe']:.5f} "
            f"(rel {r['loss_rel_err']:.2e}), logits rel {r['logits_rel_err']:.2e}, "
            f"grads rel max {r['grad_rel_err_max']:.2e} median {r['grad_rel_err_median']:.2e} "
            f"-> {'PASS' if r['pass'] else 'FAIL'}", flush=True
        )
    if args.out:
        with open(args.out, "w") as f:
            device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
            meta = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device}
            json.dump({**meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
