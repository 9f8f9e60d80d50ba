"""Is there a faster exact attention than the one torch runs? Causal GQA (Qwen3-30B-A3B's 32/4 heads, d 128) at one
sequence length: torch's cuDNN SDPA forward and backward against every execution plan the cuDNN frontend offers.

    python benchmarks/attention_plans.py --seq 32768      # needs nvidia-cudnn-frontend (a wheel; carry it)
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from automoe.bench.measure import median_cuda_ms


def bshd(batch: int, seq: int, heads: int, dim: int) -> torch.Tensor:
    """[B, H, S, D] view of [B, S, H, D] memory: the layout the model's projections produce."""
    return torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)


def time_plans(graph, pack: dict, handle, label: str, flops: float) -> None:
    for i in range(graph.get_execution_plan_count()):
        workspace = torch.empty(graph.get_workspace_size_plan_at_index(i), device="cuda", dtype=torch.uint8)
        ms = median_cuda_ms(lambda i=i, w=workspace: graph.execute_plan_at_index(pack, w, i, handle=handle), 5, 2)
        print(f"  cuDNN frontend {label} plan {i}: {ms:.2f} ms ({flops / ms / 1e9:.0f} TFLOP/s)", flush=True)


def build_all_plans(graph, cudnn) -> None:
    """Every execution plan cuDNN's heuristics (A, B and the fallback list) offer for the graph, built."""
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)


def frontend_plans(q, k, v, o, d_o, scale: float, flops_fwd: float) -> None:
    import cudnn

    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    types = dict(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                 compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    stats = torch.empty(q.shape[0], q.shape[1], q.shape[2], 1, device="cuda", dtype=torch.float32)
    out = torch.empty_like(q)

    fwd = cudnn.pygraph(**types)
    tq, tk, tv = fwd.tensor_like(q), fwd.tensor_like(k), fwd.tensor_like(v)
    to, ts = fwd.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=True, attn_scale=scale, use_causal_mask=True)
    to.set_output(True).set_dim(out.size()).set_stride(out.stride())
    ts.set_output(True).set_dim(stats.size()).set_stride(stats.stride()).set_data_type(cudnn.data_type.FLOAT)
    build_all_plans(fwd, cudnn)
    time_plans(fwd, {tq: q, tk: k, tv: v, to: out, ts: stats}, handle, "forward", flops_fwd)
    print(f"  forward output max |diff| vs torch: {(out - o).abs().max().item():.3g}", flush=True)

    bwd = cudnn.pygraph(**types)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bq, bk, bv, bo, bdo, bs = (bwd.tensor_like(t) for t in (q, k, v, out, d_o, stats))
    rq, rk, rv = bwd.sdpa_backward(name="sdpa_bwd", q=bq, k=bk, v=bv, o=bo, dO=bdo, stats=bs, attn_scale=scale,
                                   use_causal_mask=True)
    for t, like in ((rq, dq), (rk, dk), (rv, dv)):
        t.set_output(True).set_dim(like.size()).set_stride(like.stride())
    build_all_plans(bwd, cudnn)
    pack = {bq: q, bk: k, bv: v, bo: out, bdo: d_o, bs: stats, rq: dq, rk: dk, rv: dv}
    time_plans(bwd, pack, handle, "backward", 2.5 * flops_fwd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    q = bshd(1, args.seq, args.heads, args.head_dim).requires_grad_()
    k = bshd(1, args.seq, args.kv_heads, args.head_dim).requires_grad_()
    v = bshd(1, args.seq, args.kv_heads, args.head_dim).requires_grad_()
    flops_fwd = 2 * args.heads * args.seq * args.seq * args.head_dim  # causal: half of 4·H·S²·D
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, seq {args.seq}", flush=True)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        d_o = torch.randn_like(o)
        fwd = median_cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 5, 2)

        def fwd_bwd():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            torch.autograd.grad(out, (q, k, v), d_o)

        bwd = median_cuda_ms(fwd_bwd, 5, 2) - fwd
    print(f"  torch cuDNN SDPA: forward {fwd:.2f} ms ({flops_fwd / fwd / 1e9:.0f} TFLOP/s), backward {bwd:.2f} ms "
          f"({2.5 * flops_fwd / bwd / 1e9:.0f} TFLOP/s)", flush=True)
    frontend_plans(q.detach(), k.detach(), v.detach(), o.detach(), d_o, 1 / math.sqrt(args.head_dim), flops_fwd)


if __name__ == "__main__":
    main()
