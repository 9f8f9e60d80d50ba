"""Where a bench step's wall time goes beyond its kernels: one column at one sequence length, timed as
`automoe bench` times it, then one profiled step whose trace is searched for GPU idle gaps (what ran before,
what was launched after, and from which CPU op), blocking CUDA runtime calls, and the allocator's retries.

    python benchmarks/step_timeline.py --column automoe --seq 32768 --out $OUT/timeline

A profiler summary table (benchmarks/profiles/) sums kernel time; this finds the time no kernel ran.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from automoe.bench.columns import ColumnSpec, build_model, build_optimizer
from automoe.bench.measure import GIB, measure, tokens_for, train_step
from automoe.bench.workload import make_config

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
BLOCKING_CALLS = ("Synchronize", "cudaMalloc", "cudaFree", "Memcpy", "cuMemMap", "cuMemCreate", "cuMemUnmap",
                  "cuMemRelease", "cuMemAddressReserve", "cuModuleLoad")


def trace_step(model, optimizer, tokens: torch.Tensor, path: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(model, optimizer, tokens)
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    return json.loads(path.read_text())


class CpuOps:
    """The CPU ops of one thread, for 'which op was running at time t'."""

    def __init__(self, ops: list[dict]) -> None:
        self.ops = sorted(ops, key=lambda e: e["ts"])
        self.starts = [e["ts"] for e in self.ops]

    def stack_at(self, t: float) -> list[str]:
        i = bisect.bisect_right(self.starts, t)
        enclosing = [e for e in self.ops[max(0, i - 2000):i] if e["ts"] + e.get("dur", 0) >= t]
        return [e["name"] for e in enclosing]


def analyse(trace: dict, min_gap_us: float) -> dict:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    cpu_by_tid: dict = defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op":
            cpu_by_tid[e["tid"]].append(e)
    cpu = {tid: CpuOps(ops) for tid, ops in cpu_by_tid.items()}

    def launch_of(kernel: dict) -> tuple[dict | None, list[str]]:
        """The runtime call that launched `kernel`, and the CPU ops running when it did."""
        launch = launches.get(kernel["args"].get("correlation"))
        stack = cpu[launch["tid"]].stack_at(launch["ts"]) if launch and launch["tid"] in cpu else []
        return launch, stack

    busy_end, gaps, busy = gpu[0]["ts"], [], 0.0
    for prev, e in zip([None] + gpu[:-1], gpu, strict=True):
        start, end = e["ts"], e["ts"] + e["dur"]
        if start > busy_end and prev is not None and start - busy_end >= min_gap_us:
            launch, stack = launch_of(e)
            gaps.append({"gap_us": start - busy_end, "after": prev["name"][:80], "before": e["name"][:80],
                         "launched_from": stack[-4:], "launch_call": launch["name"] if launch else None})
        busy += max(0.0, end - max(start, busy_end))
        busy_end = max(busy_end, end)
    span = busy_end - gpu[0]["ts"]
    by_op = _tally((" > ".join(g["launched_from"][-2:]) or "(no cpu op)", g["gap_us"]) for g in gaps)
    by_kernel = _tally((f'{e["name"][:60]} <- {" > ".join(launch_of(e)[1][-2:])}', e["dur"])
                       for e in gpu if e["dur"] >= 50)
    calls = (e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver"))
    blocking = _tally((e["name"], e["dur"]) for e in calls if any(b in e["name"] for b in BLOCKING_CALLS))
    return {
        "gpu_span_ms": span / 1e3, "gpu_busy_ms": busy / 1e3, "idle_ms": (span - busy) / 1e3,
        "gaps_over_min_ms": sum(g["gap_us"] for g in gaps) / 1e3, "num_gaps_over_min": len(gaps),
        "gaps_by_launching_op": by_op[:25],
        "largest_gaps": sorted(gaps, key=lambda g: -g["gap_us"])[:25],
        "kernels_by_launching_op": by_kernel[:60],
        "blocking_calls": blocking,
    }


def _tally(items) -> list[list]:
    """(key, microseconds) pairs -> [key, count, milliseconds] rows, largest total first."""
    totals: dict = defaultdict(lambda: [0, 0.0])
    for key, us in items:
        totals[key][0] += 1
        totals[key][1] += us
    return sorted(([k, n, us / 1e3] for k, (n, us) in totals.items()), key=lambda r: -r[2])


def allocator_stats() -> dict:
    s = torch.cuda.memory_stats()
    return {"num_alloc_retries": s.get("num_alloc_retries", 0), "num_device_alloc": s.get("num_device_alloc", 0),
            "num_device_free": s.get("num_device_free", 0),
            "reserved_gib": torch.cuda.memory_reserved() / GIB, "peak_gib": torch.cuda.max_memory_allocated() / GIB}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--column", default="automoe", choices=["automoe", "v5", "v5+liger"])
    p.add_argument("--optimizer", default="automoe")
    p.add_argument("--workload", default="qwen3-30b-a3b-l8")
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--min-gap-us", type=float, default=20.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU: it reads the GPU's timeline")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = make_config(args.workload)
    spec = ColumnSpec(args.column, optimizer=args.optimizer if args.column == "automoe" else "torch")
    model = build_model(spec, config, device)
    optimizer = build_optimizer(spec, model)
    tokens = tokens_for(config.vocab_size, 1, args.seq, 0, device)
    before = allocator_stats()
    timed = measure(model, optimizer, tokens, args.warmup, args.steps)
    after = allocator_stats()
    report = {"column": spec.label, "seq": args.seq, "step_ms": timed["step_ms"], "fwd_loss_ms": timed["fwd_loss_ms"],
              "bwd_ms": timed["bwd_ms"], "optimizer_ms": timed["optimizer_ms"], "step_tps": timed["step_tps"],
              "allocator_before": before, "allocator_after": after}
    report["timeline"] = analyse(trace_step(model, optimizer, tokens, out / f"trace-{spec.key}-{args.seq}.json"),
                                 args.min_gap_us)
    (out / f"timeline-{spec.key}-{args.seq}.json").write_text(json.dumps(report, indent=1))
    t = report["timeline"]
    print(f"{spec.label} seq {args.seq}: step {timed['step_ms']:.1f} ms ({timed['step_tps']:,.0f} TPS); profiled "
          f"step: GPU span {t['gpu_span_ms']:.1f} ms, busy {t['gpu_busy_ms']:.1f}, idle {t['idle_ms']:.1f} "
          f"({t['num_gaps_over_min']} gaps >= {args.min_gap_us:.0f} us: {t['gaps_over_min_ms']:.1f} ms)")
    print(f"allocator during timed steps: retries {after['num_alloc_retries'] - before['num_alloc_retries']}, "
          f"cudaMalloc {after['num_device_alloc'] - before['num_device_alloc']}, "
          f"reserved {after['reserved_gib']:.1f} GiB, peak {after['peak_gib']:.1f} GiB")
    for op, n, ms in t["gaps_by_launching_op"][:12]:
        print(f"  gaps {ms:7.2f} ms  x{n:<4d} launched from {op}")
    for name, n, ms in t["blocking_calls"][:8]:
        print(f"  blocking {ms:7.2f} ms  x{n:<4d} {name}")
    for g in t["largest_gaps"][:8]:
        print(f"  gap {g['gap_us'] / 1e3:6.2f} ms after {g['after'][:40]!r} before {g['before'][:40]!r} "
              f"from {g['launched_from'][-2:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
