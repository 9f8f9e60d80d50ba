"""The expert-parallel code at ep 1 (a loopback all-to-all) against the single-device fused step, one run.

Columns, each in a process of its own, same seed, weights and tokens:
  single      automoe without a distributed setup (the fused single-device MoE path);
  loopback    a world-size-1 process group (nccl on CUDA, gloo on CPU) and
              create_distributed_setup_from_config({"ep_size": 1, "dispatcher": "all_to_all"}): every dispatch
              and combine goes through the EP code, the all-to-all sending everything to this same rank;
  old_ep      the EP path of commit e859fa7, from the src folder given by --old-src (run with that folder first
              on PYTHONPATH): the same process group, the model built at ep 1, then each MoEBlock's dispatcher
              set to that code's AllToAllDispatcher by hand, which takes its unfused EP path.
Every column trains the same weights: the single-device model is built from --seed and, for the distributed
columns, copied into the distributed model before it trains. Before timing, one step counts the all-to-all calls
(a distributed column that makes none is an error, not a figure). Timing is automoe.bench.measure's.

GPU:  python benchmarks/ep_loopback.py --old-src .old_src --out $OUT
CPU:  python benchmarks/ep_loopback.py --old-src /tmp/old_src --device cpu --tiny --out /tmp/ep_loopback
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

COLUMNS = ("single", "loopback", "old_ep")
WITHIN = 1.05  # the bar: the loopback step within 5% of the single-device step


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="qwen3-30b-a3b-l8")
    p.add_argument("--tiny", action="store_true", help="the bench's tiny workload at seq 64 (CPU dry run)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--router", default="model", choices=["model", "balanced"])
    p.add_argument("--kernels", default="auto")
    p.add_argument("--optimizer", default="automoe", help="automoe.bench's optimizer names (automoe, torch, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--columns", default=",".join(COLUMNS))
    p.add_argument("--old-src", default=None, help="src folder (holding automoe/) of the old EP code, for old_ep")
    p.add_argument("--out", required=True, help="folder for ep_loopback.json")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one step of each column into COLUMN_profile.txt under --out")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.workload, args.seq = "tiny", 64
    args.column_list = [c.strip() for c in args.columns.split(",") if c.strip()]
    unknown = sorted(set(args.column_list) - set(COLUMNS))
    if unknown:
        p.error(f"unknown column(s) {unknown}; choose from {', '.join(COLUMNS)}")
    if "old_ep" in args.column_list and args.worker is None:
        if args.old_src is None:
            p.error("the old_ep column needs --old-src (the src folder of commit e859fa7), or leave it out")
        if not (Path(args.old_src) / "automoe" / "__init__.py").is_file():
            p.error(f"--old-src {args.old_src!r} holds no automoe/__init__.py; pass the src folder of the old code")
    return args


# ---- one column, in its own process ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world_of_one(device: torch.device) -> None:
    """A world-size-1 process group on this machine: nccl on CUDA, gloo on CPU (also used by ep_host_costs.py and
    ep_model.py)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _copy_weights(model, reference) -> None:
    """reference's weights into model, parameter by parameter (at world size 1 a DTensor's local part is all)."""
    from torch.distributed.tensor import DTensor

    mine, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    if mine.keys() != theirs.keys():
        raise RuntimeError(f"distributed and single-device models differ in parameters: "
                           f"{sorted(mine.keys() ^ theirs.keys())[:5]}")
    with torch.no_grad():
        for name, param in mine.items():
            (param.to_local() if isinstance(param, DTensor) else param).copy_(theirs[name])


def _build_distributed(column: str, config, options: dict, device: torch.device):
    from automoe import AutoMoEForCausalLM, create_distributed_setup_from_config
    from automoe.moe.block import MoEBlock

    init_world_of_one(device)
    keys = {"ep_size": 1, "dispatcher": "all_to_all"} if column == "loopback" else {"ep_size": 1}
    setup = create_distributed_setup_from_config(keys)
    model = AutoMoEForCausalLM.from_config(config, automoe_options=options, distributed_setup=setup,
                                           dtype=torch.bfloat16, attn_implementation="sdpa")
    if column == "old_ep":
        from automoe.distributed.dispatch import AllToAllDispatcher

        group = setup.ep_mesh.get_group()
        for block in model.modules():
            if isinstance(block, MoEBlock):
                block.dispatcher = AllToAllDispatcher(block.spec.experts.num_experts, group)
    return model


def count_all_to_all(model, optimizer, tokens: torch.Tensor) -> int:
    """torch.distributed.all_to_all_single calls in one training step."""
    import torch.distributed as dist

    from automoe.bench.measure import train_step

    calls = 0
    original = dist.all_to_all_single

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    dist.all_to_all_single = counting
    try:
        train_step(model, optimizer, tokens)
    finally:
        dist.all_to_all_single = original
    return calls


def run_worker(args: argparse.Namespace) -> dict:
    import automoe
    from automoe.bench.columns import ColumnSpec, build_model, build_optimizer
    from automoe.bench.measure import measure, tokens_for
    from automoe.bench.workload import make_config

    column, device = args.worker, torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    config = make_config(args.workload)
    spec = ColumnSpec("automoe", router=args.router, kernels=args.kernels, optimizer=args.optimizer)
    torch.manual_seed(args.seed)
    model = build_model(spec, config, device)
    if column != "single":
        reference = model
        options = {"kernels": spec.kernels, "fused_loss": True, "router": spec.router}
        model = _build_distributed(column, config, options, device)
        _copy_weights(model, reference)
        del reference
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    optimizer = build_optimizer(spec, model)
    tokens = tokens_for(config.vocab_size, args.batch, args.seq, args.seed, device)
    calls = count_all_to_all(model, optimizer, tokens)
    if column != "single" and calls == 0:
        raise RuntimeError(f"column {column}: no all-to-all ran in a training step, so the EP code was not used")
    # every column makes that counting step, so the timed steps still start from equal weights in all
    result = measure(model, optimizer, tokens, args.warmup, args.steps)
    result.update(column=column, all_to_all_calls_per_step=calls, automoe_src=os.path.dirname(automoe.__file__))
    if args.profile:
        result.update(profile_step(model, optimizer, tokens, Path(args.out) / f"{column}_profile.txt"))
    print(f"[{column}] {result['step_ms']:.1f} ms/step, {result['step_tps']:,.0f} TPS, "
          f"peak {result.get('peak_gib', float('nan')):.1f} GiB, {calls} all-to-all calls/step", flush=True)
    return result


def profile_step(model, optimizer, tokens: torch.Tensor, path: Path) -> dict:
    """Where a column's forward spends its time: the host's time to issue the forward (until it returns, no
    sync) against its wall time, and one profiled step's ops by host and by device time, written to `path`."""
    import time

    from automoe.bench.measure import train_step

    sync = torch.cuda.synchronize if tokens.is_cuda else (lambda: None)
    host, wall = [], []
    for _ in range(5):
        sync()
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        host.append((time.perf_counter() - start) * 1e3)
        sync()
        wall.append((time.perf_counter() - start) * 1e3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if tokens.is_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        train_step(model, optimizer, tokens)
        sync()
    averages = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [f"forward: host issue {min(host):.1f} ms, wall {min(wall):.1f} ms (min of 5 training steps)",
            "host issue ms: " + " ".join(f"{t:.1f}" for t in host),
            "wall ms: " + " ".join(f"{t:.1f}" for t in wall), "",
            averages.table(sort_by="self_cpu_time_total", row_limit=45)]
    if tokens.is_cuda:
        text += ["", averages.table(sort_by="self_cuda_time_total", row_limit=30)]
    path.write_text("\n".join(text))
    print(f"wrote {path}: forward host issue {text[1]}, {text[2]}", flush=True)
    return {"forward_host_issue_ms": min(host), "forward_wall_ms": min(wall)}


# ---- the driver ----

def run_column(column: str, args: argparse.Namespace, argv: list[str]) -> dict:
    env = dict(os.environ)
    if column == "old_ep":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(args.old_src), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "column.json"
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", column, "--result", str(out)]
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0 or not out.exists():
            return {"column": column, "error": f"exit {proc.returncode}"}
        return json.loads(out.read_text())


def summarise(columns: dict[str, dict]) -> dict:
    base = columns.get("single", {})
    out = {}
    for name, col in columns.items():
        if name != "single" and "step_ms" in col and "step_ms" in base:
            out[f"{name}_step_ratio"] = col["step_ms"] / base["step_ms"]
            pairs = zip(col["losses"], base["losses"], strict=True)
            out[f"{name}_max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in pairs)
    if "loopback_step_ratio" in out:
        out["loopback_within_5_percent"] = out["loopback_step_ratio"] <= WITHIN
    return out


def table(columns: dict[str, dict], summary: dict) -> str:
    lines = ["| column | step ms | fwd+loss / bwd / opt ms | step TPS | peak GiB | all-to-all calls/step | x single |",
             "|---|---|---|---|---|---|---|"]
    for name, col in columns.items():
        if "error" in col:
            lines.append(f"| {name} | failed: {col['error']} | | | | | |")
            continue
        ratio = summary.get(f"{name}_step_ratio", 1.0)
        lines.append(f"| {name} | {col['step_ms']:.1f} | {col['fwd_loss_ms']:.1f} / {col['bwd_ms']:.1f} / "
                     f"{col['optimizer_ms']:.1f} | {col['step_tps']:,.0f} | {col.get('peak_gib', float('nan')):.1f} | "
                     f"{col['all_to_all_calls_per_step']} | {ratio:.3f} |")
    return "\n".join(lines)


def _figure(col: dict) -> str:
    if "error" in col:
        return f"failed ({col['error']})"
    return (f"{col['step_ms']:.1f} ms/step ({col['step_tps']:,.0f} TPS), fwd+loss {col['fwd_loss_ms']:.1f} / bwd "
            f"{col['bwd_ms']:.1f} / opt {col['optimizer_ms']:.1f} ms, peak {col.get('peak_gib', float('nan')):.1f} GiB")


def results_row(result: dict) -> str:
    """A draft benchmarks/RESULTS.md row of this run (the JSON link is left to fill in)."""
    cols, a = result["columns"], result["args"]
    ratios = ", ".join(f"{name} x{result[f'{name}_step_ratio']:.3f} (max loss rel diff "
                       f"{result[f'{name}_max_loss_rel_diff']:.1e})" for name in cols if f"{name}_step_ratio" in result)
    verdict = {True: "within 5%", False: "NOT within 5%"}.get(result.get("loopback_within_5_percent"), "")
    return (f"| {result['date'][:16].replace('T', ' ')} UTC | {result['device']} (torch {result['torch']}) | "
            f"`{result['command']}` | {a['workload']}, seq {a['seq']}, batch {a['batch']}, bf16, {a['optimizer']} "
            f"AdamW, router {a['router']}; median of {a['steps']} after {a['warmup']} warm-up | single-device: "
            f"{_figure(cols.get('single', {'error': 'not run'}))} | "
            + "; ".join(f"{name}: {_figure(col)}" for name, col in cols.items() if name != "single")
            + f" | {ratios}; loopback {verdict} | [json](results/...) |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.worker:
        result = run_worker(args)
        with open(args.result, "w") as f:
            json.dump(result, f)
        return 0
    columns = {}
    for column in args.column_list:
        columns[column] = run_column(column, args, argv)
    summary = summarise(columns)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/ep_loopback.py " + " ".join(argv),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result", "column_list")},
        "columns": columns,
        **summary,
    }
    print(table(columns, summary))
    print(json.dumps(summary))
    print("RESULTS.md row: " + results_row(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ep_loopback.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'ep_loopback.json'}")
    return 1 if any("error" in c for c in columns.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
