"""The distributed path at world size 1 (ep_size 1) against the non-distributed drop-in model, same run.

Columns: the drop-in model; the distributed path as users get it (at world size 1 there is nothing to shard or
reduce, so parallelize_model wraps nothing in FSDP2: meta build, per-rank checkpoint read, NCCL process group);
and the distributed path with FSDP2 applied anyway, through a mixed-precision policy that casts nothing
(param_dtype bf16 on bf16 weights), which shows what FSDP2's own copies cost at one rank.

Run:  torchrun --nproc_per_node 1 benchmarks/distributed_ws1.py --out $OUT/distributed_ws1.json
      (add --tiny for a CPU/gloo dry run of the same code on a tiny model)

Workload qwen3-30b-a3b-l8 of BENCHMARKS.md: Qwen3-30B-A3B shape with 8 layers, seq 4096, batch 1, bf16, AdamW
(fused). Both models cannot live on one 80 GB GPU together, so they run in sequence: the drop-in model is built
with random weights and saved with transformers' save_pretrained (per-expert keys) before it trains; after it is
freed, the distributed model loads that checkpoint (each rank reads its own slices) and trains on the same batches.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from automoe import AutoMoEForCausalLM, AutoMoEOptions, create_distributed_setup_from_config, optimize_model
from automoe.bench.workload import QWEN3_30B_A3B

L8 = {**QWEN3_30B_A3B, "num_hidden_layers": 8}
TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48, vocab_size=128,
            tie_word_embeddings=False, num_hidden_layers=2, norm_topk_prob=True, max_position_embeddings=128)

COLUMNS = {"distributed_ep1": {}, "fsdp2_forced_ep1": {"param_dtype": "bfloat16"}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train(model, batches, device, warmup: int) -> dict:
    """Step = forward + loss + backward + optimizer step; median over the steps after warm-up."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    model.train()
    losses, steps, fwd, bwd = [], [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for ids in batches:
        ids = ids.to(device)
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        losses.append(loss.item())
        steps.append(t3 - t0)
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    tokens = batches[0].numel()
    step_ms = statistics.median(steps[warmup:]) * 1e3
    result = {
        "losses": losses,
        "step_ms": step_ms,
        "fwd_loss_ms": statistics.median(fwd[warmup:]) * 1e3,
        "bwd_ms": statistics.median(bwd[warmup:]) * 1e3,
        "step_tps": tokens / step_ms * 1e3,
        "all_step_ms": [s * 1e3 for s in steps],
        "all_fwd_loss_ms": [s * 1e3 for s in fwd],
        "all_bwd_ms": [s * 1e3 for s in bwd],
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del optimizer
    return result


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--checkpoint-dir", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    seq = 32 if args.tiny else args.seq
    config = Qwen3MoeConfig(**(TINY if args.tiny else L8))
    dtype = torch.bfloat16
    generator = torch.Generator().manual_seed(1234)
    batches = [torch.randint(0, config.vocab_size, (1, seq), generator=generator) for _ in range(args.steps)]
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "world_size": dist.get_world_size(), "workload": "tiny" if args.tiny else "qwen3-30b-a3b-l8",
               "seq": seq, "batch": 1, "dtype": "bfloat16", "optimizer": "AdamW(fused=True)" if cuda else "AdamW"}
    ckpt = args.checkpoint_dir or tempfile.mkdtemp(prefix="automoe-ws1-")

    torch.manual_seed(0)
    t0 = time.perf_counter()
    # transformers' own model built straight on the GPU, then automoe's swap (what from_config does); the
    # recogniser's CPU probes must not run under a CUDA default device
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = optimize_model(model, AutoMoEOptions())
    results["dropin_build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(ckpt)
    results["hf_save_s"] = time.perf_counter() - t0
    results["dropin"] = train(model, batches, device, args.warmup)
    print(json.dumps({"dropin": results["dropin"]}), flush=True)
    del model
    free(device)

    for label, extra in COLUMNS.items():
        setup = create_distributed_setup_from_config({"strategy": "fsdp2", "ep_size": 1, **extra})
        t0 = time.perf_counter()
        model = AutoMoEForCausalLM.from_pretrained(ckpt, distributed_setup=setup, dtype=dtype,
                                                   attn_implementation="sdpa")
        results[f"{label}_load_s"] = time.perf_counter() - t0
        results[label] = train(model, batches, device, args.warmup)
        print(json.dumps({label: results[label]}), flush=True)
        del model
        free(device)

    ref = results["dropin"]
    for label in COLUMNS:
        got = results[label]
        results[f"{label}_step_ratio"] = got["step_ms"] / ref["step_ms"]
        pairs = zip(got["losses"], ref["losses"], strict=True)
        results[f"{label}_max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in pairs)
    summary = {k: v for k, v in results.items() if not isinstance(v, dict)}
    for label in ("dropin", *COLUMNS):
        summary[f"{label}_step_ms"] = results[label]["step_ms"]
        summary[f"{label}_peak_gib"] = results[label].get("peak_gib")
        summary[f"{label}_losses"] = [round(x, 5) for x in results[label]["losses"]]
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
