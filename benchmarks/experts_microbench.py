"""Experts microbenchmark: one Qwen3-30B-A3B MoE block (E=128, H=2048, I=768, top-8), forward + backward
(routing, permute, both GEMMs, activation, weighted combine), in TFLOP/s of expert GEMM work
(6 x T x k x 3 x H x I), beside the dense bf16 matmul rate measured in the same run.

Columns: automoe's MoEBlock (kernels on), Transformers v5's block with experts_implementation="grouped_mm",
v5 + Liger-Kernel's patch (when liger_kernel imports; built last because it patches classes), and the bare
`torch._grouped_mm` + SwiGLU on pre-sorted tokens as a reference point.

    python benchmarks/experts_microbench.py [--tokens 4096 16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import torch
import torch.nn.functional as F
import transformers

from automoe import AutoMoEForCausalLM
from automoe.bench.measure import dense_matmul_tflops, median_cuda_ms

SHAPE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=128,
             num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144, vocab_size=1024,
             num_hidden_layers=1, norm_topk_prob=True)


def block(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**SHAPE)
    with torch.device("cuda"):
        if kind == "automoe":
            model = AutoMoEForCausalLM.from_config(config, dtype=torch.bfloat16)
        else:
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=torch.bfloat16, experts_implementation="grouped_mm")
    return model.model.layers[0].mlp.train()


def bare_grouped(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    h = torch._grouped_mm(x, w1, offs=offsets)
    gate, up = h.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, w2, offs=offsets)


def fwd_bwd(module, x, grad):
    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(grad)

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    h, i, e, k = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"], SHAPE["num_experts"], 8
    dense = dense_matmul_tflops(torch.device("cuda"))
    blocks = {"automoe": block("automoe"), "v5 grouped_mm": block("v5")}
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_moe

        apply_liger_kernel_to_qwen3_moe()
        blocks["v5 + Liger"] = block("liger")
    result = {"device": torch.cuda.get_device_name(0), "dense_tflops": dense, "shape": dict(E=e, H=h, I=i, k=k),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "liger_fused_moe_autotune": os.environ.get("LIGER_FUSED_MOE_AUTOTUNE", "default (on)"), "rows": []}
    for tokens in args.tokens:
        flops = 6 * tokens * k * 3 * h * i
        x = torch.randn(1, tokens, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        row = {"tokens": tokens}
        for name, module in blocks.items():
            row[name] = flops / (median_cuda_ms(fwd_bwd(module, x, grad)) * 1e-3) / 1e12
            print(f"T={tokens} {name}: {row[name]:.0f} TFLOP/s", flush=True)  # Liger's autotune can run long
        # bare grouped_mm + SwiGLU on tokens already sorted into equal groups (no routing, permute or combine)
        w1 = (torch.randn(e, h, 2 * i, device="cuda") * 0.02).bfloat16().requires_grad_(True)
        w2 = (torch.randn(e, i, h, device="cuda") * 0.02).bfloat16().requires_grad_(True)
        xs = torch.randn(tokens * k, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        offsets = torch.arange(1, e + 1, device="cuda", dtype=torch.int32) * (tokens * k // e)
        gs = torch.randn(tokens * k, h, device="cuda", dtype=torch.bfloat16)

        def bare(xs=xs, w1=w1, w2=w2, offsets=offsets, gs=gs):
            xs.grad = w1.grad = w2.grad = None
            bare_grouped(xs, w1, w2, offsets).backward(gs)

        row["bare grouped_mm + SwiGLU"] = flops / (median_cuda_ms(bare) * 1e-3) / 1e12
        result["rows"].append(row)
    names = [n for n in result["rows"][0] if n != "tokens"]
    print(f"dense bf16 matmul: {dense:.0f} TFLOP/s ({result['device']})")
    print("tokens | " + " | ".join(names))
    for row in result["rows"]:
        cells = [f"{row[n]:.0f} TFLOP/s ({row[n] / dense:.0%})" for n in names]
        print(f"{row['tokens']} | " + " | ".join(cells))
    for row in result["rows"]:
        ratios = {n: row["automoe"] / row[n] for n in names if n != "automoe"}
        print(f"T={row['tokens']}: automoe x" + ", x".join(f"{r:.2f} vs {n}" for n, r in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
