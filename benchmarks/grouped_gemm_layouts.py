"""The six expert GEMMs of one routed-experts forward+backward through torch._grouped_mm, in the layouts automoe
uses and in the alternatives (weight gradients produced transposed and copied; weights pre-transposed), at
Qwen3-30B-A3B's expert shape and uniform random top-k routing, beside the dense bf16 rate of the same GPU.

    python benchmarks/grouped_gemm_layouts.py --tokens 32768
"""

from __future__ import annotations

import argparse

import torch

from automoe.bench.measure import median_cuda_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    e, h, i, k = args.experts, args.hidden, args.intermediate, args.top_k
    rows = args.tokens * k
    torch.manual_seed(0)
    ids = torch.rand(args.tokens, e, device="cuda").topk(k, dim=1).indices.reshape(-1)
    offs = torch.cumsum(torch.bincount(ids, minlength=e), 0, dtype=torch.int32)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    xs, dh = torch.randn(rows, h, **bf), torch.randn(rows, 2 * i, **bf)
    act, dy = torch.randn(rows, i, **bf), torch.randn(rows, h, **bf)
    w1, w2 = torch.randn(e, 2 * i, h, **bf), torch.randn(e, h, i, **bf)  # HF's [E, out, in]
    w1_in_out, w2_in_out = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    gmm = torch._grouped_mm
    big, small = 2 * rows * h * 2 * i, 2 * rows * i * h
    cases = [
        ("forward gate/up   xs @ w1^T (used)", lambda: gmm(xs, w1.transpose(1, 2), offs=offs), big),
        ("forward down      act @ w2^T (used)", lambda: gmm(act, w2.transpose(1, 2), offs=offs), small),
        ("backward d act    dy @ w2 (used)", lambda: gmm(dy, w2, offs=offs), small),
        ("backward d xs     dh @ w1 (used)", lambda: gmm(dh, w1, offs=offs), big),
        ("backward d W_down dy^T @ act (used)", lambda: gmm(dy.t(), act, offs=offs), small),
        ("backward d W_gu   dh^T @ xs (used)", lambda: gmm(dh.t(), xs, offs=offs), big),
        ("alt d W_down act^T @ dy, transposed copy",
         lambda: gmm(act.t(), dy, offs=offs).transpose(1, 2).contiguous(), small),
        ("alt d W_gu   xs^T @ dh, transposed copy",
         lambda: gmm(xs.t(), dh, offs=offs).transpose(1, 2).contiguous(), big),
        ("alt forward gate/up, [E, in, out] weights", lambda: gmm(xs, w1_in_out, offs=offs), big),
        ("alt forward down, [E, in, out] weights", lambda: gmm(act, w2_in_out, offs=offs), small),
        ("alt backward d act, [E, in, out] weights", lambda: gmm(dy, w2_in_out.transpose(1, 2), offs=offs), small),
        ("alt backward d xs, [E, in, out] weights", lambda: gmm(dh, w1_in_out.transpose(1, 2), offs=offs), big),
    ]
    for name, fn, flops in cases:
        ms = median_cuda_ms(fn, 10, 3)
        print(f"{name:44s} {ms:6.3f} ms {flops / ms / 1e9:5.0f} TFLOP/s", flush=True)
    a = torch.randn(8192, 8192, **bf)
    ms = median_cuda_ms(lambda: a @ a, 10, 3)
    print(f"{'dense 8192^3':44s} {ms:6.3f} ms {2 * 8192**3 / ms / 1e9:5.0f} TFLOP/s")


if __name__ == "__main__":
    main()
