"""One column of a bench run, in the process that runs it: build, measure at --seq, sweep longer sequences
at batch 1 until one does not fit, optionally profile one step; the result as JSON."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

from .columns import ColumnSpec, build_model, build_optimizer
from .measure import dense_matmul_tflops, is_oom, measure, release, tokens_for, train_step
from .workload import make_config


def sweep_seqs(seq: int, max_seq: int) -> list[int]:
    seqs, s = [], seq
    while s <= max_seq:
        seqs.append(s)
        s *= 2
    return seqs


def profile_step(model, optimizer, tokens: torch.Tensor, path: str) -> None:
    """torch.profiler summary table of one training step (forward+loss, backward, optimizer), and beside it (.json)
    every op's name, calls and self/total device and host time in microseconds, for comparing two columns' steps
    (benchmarks/profile_compare.py)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tokens.is_cuda else [])
    with profile(activities=activities) as prof:
        train_step(model, optimizer, tokens)
        if tokens.is_cuda:
            torch.cuda.synchronize()
    sort = "cuda_time_total" if tokens.is_cuda else "cpu_time_total"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70))
    ops = [{"name": e.key, "calls": e.count, "self_device_us": e.self_device_time_total,
            "device_us": e.device_time_total, "self_cpu_us": e.self_cpu_time_total, "cpu_us": e.cpu_time_total}
           for e in prof.key_averages()]
    Path(path).with_suffix(".json").write_text(json.dumps(ops))


def run_column(spec: ColumnSpec, args: argparse.Namespace, device: torch.device) -> dict:
    config = make_config(args.workload, args.layers)
    out: dict = {"column": spec.name, "key": spec.key, "label": spec.label, "runs": []}
    if args.dense:
        out["dense_tflops"] = dense_matmul_tflops(device)
    if spec.name == "nemo":
        return run_nemo(spec, args, config, device, out)
    torch.manual_seed(args.seed)
    model = build_model(spec, config, device)
    optimizer = build_optimizer(spec, model)
    measure_plan(spec, args, config, device, model, optimizer, out)
    return out


def measure_plan(spec: ColumnSpec, args: argparse.Namespace, config, device: torch.device, model, optimizer,
                 out: dict) -> None:
    """--seq at --batch, then the batch-1 sweep to --max-seq, into out["runs"]; stops at the first OOM."""
    plan = [(args.batch, args.seq)]
    if args.max_seq:
        plan += [(1, s) for s in sweep_seqs(args.seq, args.max_seq) if (1, s) != plan[0]]
    for batch, seq in plan:
        tokens = tokens_for(config.vocab_size, batch, seq, args.seed, device)
        try:
            result = measure(model, optimizer, tokens, args.warmup, args.steps)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_oom(error):
                raise
            release(optimizer)
            out["runs"].append({"seq": seq, "batch": batch, "oom": True, "error": str(error).splitlines()[0]})
            break
        out["runs"].append(result)
        print(f"[{spec.name}] batch {batch} seq {seq}: {result['step_tps']:,.0f} step TPS", file=sys.stderr, flush=True)
        if args.profile and (batch, seq) == plan[0]:
            profile_step(model, optimizer, tokens, f"{args.profile}/profile-{spec.key}.txt")


def run_nemo(spec: ColumnSpec, args: argparse.Namespace, config, device: torch.device, out: dict) -> dict:
    """NeMo's custom path, then its HF path if the custom one fails before it has trained a step; never raises:
    what failed is in out["nemo"]["errors"] (and out["error"] when neither path trained)."""
    from . import nemo_column

    errors: dict[str, str] = {}
    out["nemo"] = {"versions": nemo_column.versions(), "ran": None, "errors": errors}
    for path in nemo_column.PATHS:
        model = optimizer = None
        try:
            torch.manual_seed(args.seed)
            model, info = nemo_column.build(path, config, args.router, args.seed)
            optimizer = build_optimizer(spec, model)
            out["nemo"]["ran"], out["label"] = info, nemo_column.label(info)
            measure_plan(spec, args, config, device, model, optimizer, out)
            break
        except Exception as error:  # any failure of NeMo's is a result of this column, not a crash of the bench
            errors[path] = nemo_column.error_text(error)
            print(f"[nemo] {path} path failed: {errors[path]}", file=sys.stderr, flush=True)
            if out["runs"]:  # it trained: a failure further along the sweep ends it, no fallback
                break
            out["nemo"]["ran"], out["label"] = None, spec.label
        finally:
            del model, optimizer  # a failed path's model must not hold the memory of the next one
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    out["notes"] = nemo_column.notes(out["nemo"]["ran"], errors)
    if not out["runs"]:
        out["error"] = "; ".join(f"{path} path: {text}" for path, text in errors.items())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m automoe.bench.worker")
    parser.add_argument("--column", required=True)
    parser.add_argument("--optimizer", default="torch")
    parser.add_argument("--args", required=True, help="the bench's arguments as JSON")
    parser.add_argument("--out", required=True)
    ns = parser.parse_args(argv)
    args = argparse.Namespace(**json.loads(ns.args))
    spec = ColumnSpec(ns.column, router=args.router, kernels=args.kernels, optimizer=ns.optimizer)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    result = run_column(spec, args, device)
    with open(ns.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
