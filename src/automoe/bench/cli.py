"""`automoe bench`: automoe against native Transformers v5 (and v5 + Liger-Kernel when it imports), same
shape, seed, tokens, optimizer and precision, one column at a time; prints the table, writes JSON + PNG.

One GPU: each column runs in a subprocess of its own (built, measured, freed; Liger patches classes).
Under torchrun: every rank runs the columns in-process, FSDP2 on all of them, Liger's last.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import nemo_column
from .columns import COLUMNS, DEFAULT_COLUMNS, OPTIMIZERS, ColumnSpec, liger_available
from .report import table, write
from .workload import WORKLOADS, flops_per_token, make_config, mamba_kernels


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="automoe bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="qwen3-30b-a3b-l8", choices=sorted(WORKLOADS))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the workload's)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length of the main measurement (default: 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step at --seq (default: 1)")
    p.add_argument("--steps", type=int, default=7, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones (default: 3)")
    p.add_argument("--router", default="model", choices=["model", "balanced"],
                   help="automoe's router: the model's own, or forced balanced (labelled in the output)")
    p.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                   help=f"comma-separated, from {', '.join(COLUMNS)} (default: {','.join(DEFAULT_COLUMNS)})")
    p.add_argument("--max-seq", type=int, default=0,
                   help="sequence sweep at batch 1: double --seq up to this until a column runs out of memory")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch", "off"],
                   help="automoe column's automoe_options['kernels']: auto (Triton on CUDA), triton, torch "
                        "(the references) or off (MoE blocks only)")
    p.add_argument("--optimizer", default="automoe",
                   help="automoe column's AdamW, comma-separated for one automoe column each: automoe "
                        "(automoe.kernels.AdamW stepped after backward), automoe-in-backward (applied as each "
                        "gradient is ready), torch (torch's fused AdamW); peers always use torch's fused AdamW")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens, the same for every column")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG")
    p.add_argument("--profile", default=None, help="folder for a torch.profiler table of one step per column")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--in-process", action="store_true", help="run columns in this process (no Liger or NeMo column)")
    p.add_argument("--nemo-path", default=None,
                   help="folder NeMo AutoModel and its pinned transformers were pip-installed into (--target); put "
                        "first on the nemo column's PYTHONPATH only, so the other columns keep this transformers")
    p.add_argument("--lora", action="store_true",
                   help="LoRA on one GPU instead: automoe + peft against v5 + peft, q/k/v/o and both expert tensors "
                        "(bench/lora.py says what it measures; --seq, --max-seq, --steps, --warmup apply)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank with --lora (alpha = 2 x rank)")
    args = p.parse_args(argv)
    args.column_list = [c.strip() for c in args.columns.split(",") if c.strip()]
    unknown = sorted(set(args.column_list) - set(COLUMNS))
    if unknown:
        p.error(f"unknown column(s) {unknown}; choose from {', '.join(COLUMNS)}")
    args.optimizer_list = [o.strip() for o in args.optimizer.split(",") if o.strip()]
    bad = sorted(set(args.optimizer_list) - set(OPTIMIZERS))
    if bad:
        p.error(f"unknown optimizer(s) {bad}; choose from {', '.join(OPTIMIZERS)}")
    if args.max_seq and args.max_seq < args.seq:
        p.error(f"--max-seq {args.max_seq} is below --seq {args.seq}")
    return args


def worker_args(args: argparse.Namespace, dense: bool) -> dict:
    keys = ("workload", "layers", "seq", "batch", "steps", "warmup", "router", "max_seq", "kernels", "device",
            "seed", "profile")
    return {**{k: getattr(args, k) for k in keys}, "dense": dense}


def column_skips(args: argparse.Namespace, in_process: bool) -> dict[str, str]:
    """The asked-for columns that cannot run here, each with why."""
    reasons = {}
    if not liger_available() or (in_process and int(os.environ.get("WORLD_SIZE", "1")) == 1):
        reasons["v5+liger"] = "liger-kernel not importable, or --in-process"
    if in_process:
        reasons["nemo"] = "NeMo AutoModel runs in a process of its own on one GPU: not with --in-process or torchrun"
    elif not nemo_column.importable(args.nemo_path):
        where = f"--nemo-path {args.nemo_path}" if args.nemo_path else "this environment (see --nemo-path)"
        reasons["nemo"] = f"nemo_automodel not importable from {where}"
    return {c: r for c, r in reasons.items() if c in args.column_list}


def run_subprocess(spec: ColumnSpec, args: argparse.Namespace, dense: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "column.json"
        cmd = [sys.executable, "-m", "automoe.bench.worker", "--column", spec.name, "--optimizer", spec.optimizer,
               "--args", json.dumps(worker_args(args, dense)), "--out", str(out)]
        # the column's lines are passed on as they come: a run cut short (a time box, a hang in a peer's
        # autotuning) still shows every sequence the column measured
        last = "no output"
        env = nemo_column.child_env(args.nemo_path) if spec.name == "nemo" else None
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            for line in proc.stdout:
                sys.stderr.write(line)
                sys.stderr.flush()
                last = line.strip() or last
        if proc.returncode != 0 or not out.exists():
            return {"column": spec.name, "label": spec.label, "runs": [], "error": f"exit {proc.returncode}: {last}"}
        return json.loads(out.read_text())


def run_in_process(spec: ColumnSpec, args: argparse.Namespace, dense: bool) -> dict:
    from .worker import run_column

    ns = argparse.Namespace(**worker_args(args, dense))
    result = run_column(spec, ns, torch.device(args.device))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "triton", "liger-kernel", "automoe"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.lora:
        from .lora import run_lora

        return run_lora(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    in_process = args.in_process or world > 1
    skips = column_skips(args, in_process)
    columns = [c for c in args.column_list if c not in skips]
    columns.sort(key=lambda c: c == "v5+liger")  # Liger patches classes: always last
    skipped = sorted(skips)
    specs = [ColumnSpec(c, router=args.router, kernels=args.kernels, optimizer=o)
             for c in columns for o in (args.optimizer_list if c.startswith("automoe") else ["torch"])]
    # first automoe variant, then the peers (Liger last), then other automoe variants: a run cut short keeps
    # the main comparison
    specs.sort(key=lambda s: (s.automoe and s.optimizer != args.optimizer_list[0], s.name == "v5+liger"))
    run = run_in_process if in_process else run_subprocess
    config = make_config(args.workload, args.layers)
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "automoe bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "world_size": world,
        "workload": args.workload,
        "layers": config.num_hidden_layers,
        "mamba_kernels": mamba_kernels(config),
        "router": args.router,
        "versions": versions(),
        "args": {k: v for k, v in vars(args).items() if not k.endswith("_list")},
        "flops_per_token": flops_per_token(config, args.seq),
        "dense_tflops": None,
        "columns": [],
        "skipped_columns": skipped,
        "skip_reasons": skips,
    }
    for i, spec in enumerate(specs):
        result["columns"].append(run(spec, args, dense=(i == 0)))
        result["dense_tflops"] = result["columns"][0].get("dense_tflops")
        if rank == 0:  # what is done so far survives a run cut short
            write(result, Path(args.out), plot=False)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(table(result))
        if result["mamba_kernels"]:
            print(f"Mamba2 layers ran {result['mamba_kernels']}")
        for column, reason in skips.items():
            print(f"not run: {column} ({reason})")
        for col in result["columns"]:
            if col.get("error"):
                print(f"{col['label']}: failed: {col['error']}")
        for path in write(result, Path(args.out), plot=not args.no_plot):
            print(f"wrote {path}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0
