"""Where the `automoe bench --lora` step's time goes: automoe + peft (r=16 on q/k/v/o and both expert tensors, bf16
base, fp32 adapters, the in-backward AdamW) on the 48-layer Qwen3-30B-A3B at seq 4096, in each activation
checkpointing mode of automoe.bench.lora.set_checkpointing (off, attention, layer, sac).

Per mode, printed as measured: the phase medians (forward+loss, backward with the optimizer applied in it,
optimizer step), step TPS and peak memory; the host's issue time of one step against its wall time (issue close to
wall: the GPU waits for the host to launch); then one profiled step: kernel time by kind, device-busy time over
the step, kernels launched, and the top kernels. Everything also goes to OUT/lora-profile.json.

One H200 (about 2 minutes, most of it building the model and the first steps' compilation):
    PYTHONPATH=$PWD/src timeout 300 python benchmarks/lora_profile.py --out $OUT
CPU smoke run (the same code at a tiny size; kernel times are host times there):
    PYTHONPATH=$PWD/src python benchmarks/lora_profile.py --tiny --device cpu --out /tmp/lora-profile
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from profile_compare import kind
from torch.profiler import ProfilerActivity, profile

from automoe.bench.lora import AC_MODES, build, optimizer_for, set_checkpointing
from automoe.bench.measure import GIB, measure, tokens_for, train_step
from automoe.bench.workload import make_config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def issue_and_wall_ms(model, optimizer, tokens: torch.Tensor) -> tuple[float, float]:
    """(host time to issue one step, its wall time): the host returns before the device finishes unless
    something in the step waits for the device."""
    device = tokens.device
    sync(device)
    start = time.perf_counter()
    train_step(model, optimizer, tokens)
    issued = time.perf_counter()
    sync(device)
    return (issued - start) * 1e3, (time.perf_counter() - start) * 1e3


def profiled_step(model, optimizer, tokens: torch.Tensor, top: int) -> dict:
    """One step under torch.profiler: the device kernels (on CPU, the aten ops' self host time stands in)."""
    device = tokens.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        train_step(model, optimizer, tokens)
        sync(device)
    rows = []
    for event in prof.key_averages():
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            if not event.key.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        if us > 0:
            rows.append({"name": event.key, "ms": us / 1e3, "count": event.count})
    rows.sort(key=lambda r: -r["ms"])
    kinds: dict[str, float] = defaultdict(float)
    for row in rows:
        kinds[kind(row["name"])] += row["ms"]
    return {"busy_ms": sum(r["ms"] for r in rows), "launched": sum(r["count"] for r in rows),
            "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])), "top": rows[:top]}


def report(mode: str, run: dict, issue_ms: float, wall_ms: float, prof: dict, top: int) -> list[str]:
    peak = f", peak {run['peak_gib']:.1f} GiB" if run.get("peak_gib") is not None else ""
    lines = [f"== checkpointing {mode}: {run['step_tps']:,.0f} step TPS, step {run['step_ms']:.0f} ms = forward+loss "
             f"{run['fwd_loss_ms']:.0f} + backward {run['bwd_ms']:.0f} + optimizer {run['optimizer_ms']:.0f}{peak}",
             f"   host issues a step in {issue_ms:.0f} ms of its {wall_ms:.0f} ms wall time; profiled step: "
             f"{prof['busy_ms']:.0f} ms kernel time, {prof['launched']} kernels"]
    lines += [f"   {ms:8.1f} ms  {name}" for name, ms in prof["by_kind"].items()]
    lines.append(f"   top {top} kernels (ms, calls):")
    lines += [f"   {r['ms']:8.1f} {r['count']:6d}  {r['name'][:110]}" for r in prof["top"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the workload's, 48)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--modes", default="off,attention,layer,sac", help=f"comma-separated, of {AC_MODES}")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="the bench's tiny workload at seq 64 (CPU smoke run)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.tiny:
        args.workload, args.seq = "tiny", 64
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(AC_MODES))
    if unknown:
        p.error(f"--modes: unknown {unknown}; choose from {AC_MODES}")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = make_config(args.workload, args.layers)
    torch.manual_seed(args.seed)
    model = build("automoe", config, device, args)
    optimizer = optimizer_for("automoe", model, args.kernels)
    weights = torch.cuda.memory_allocated() / GIB if device.type == "cuda" else None
    print(f"automoe + peft, {args.workload}, {config.num_hidden_layers} layers, seq {args.seq}, r={args.rank}"
          + (f", weights {weights:.1f} GiB" if weights else ""), flush=True)
    tokens = tokens_for(config.vocab_size, 1, args.seq, args.seed, device)
    results = {"args": vars(args), "weights_gib": weights, "modes": {}}
    for mode in modes:
        set_checkpointing(model, mode)
        run = measure(model, optimizer, tokens, args.warmup, args.steps)
        issue_ms, wall_ms = issue_and_wall_ms(model, optimizer, tokens)
        prof = profiled_step(model, optimizer, tokens, args.top)
        print("\n".join(report(mode, run, issue_ms, wall_ms, prof, args.top)), flush=True)
        results["modes"][mode] = {**run, "issue_ms": issue_ms, "wall_ms": wall_ms, **prof}
        (out / "lora-profile.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'lora-profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
