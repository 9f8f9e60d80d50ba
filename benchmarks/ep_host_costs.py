"""Host time of each piece of the expert-parallel dispatch, at one layer's shape, in a world-size-1 group.

The loopback benchmark (ep_loopback.py) finds the EP forward host-bound: this says where the host's time goes.
Each piece runs `--reps` times back to back with no synchronisation between calls (the device work of these
pieces is tiny next to their launch cost, so the loop runs at host speed); the figure is the host's time per
call, the best of three loops. Pieces: a plain aten op (the calibration: what one launch costs), the collective
as torch.distributed calls it and through automoe's op (one tensor, and the three packed), the dispatcher's plan
(count exchange and routing bookkeeping), its dispatch (host wait for the split sizes included), its combine,
and the local dispatcher's dispatch for comparison.

GPU:  python benchmarks/ep_host_costs.py --out $OUT
CPU:  python benchmarks/ep_host_costs.py --device cpu --tokens 256 --out /tmp/ep_host_costs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from ep_loopback import init_world_of_one  # this folder's script, on sys.path when run as one


def host_us(fn, device: torch.device, reps: int) -> float:
    """Best of three loops of `reps` calls: host microseconds per call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps * 1e6)
        sync()
    return best


def measure(args: argparse.Namespace) -> dict:
    from automoe.distributed.collectives import all_to_all, register_group
    from automoe.distributed.dispatch import AllToAllDispatcher, start_to_host
    from automoe.moe.dispatch import LocalDispatcher, token_major

    device = torch.device(args.device)
    init_world_of_one(device)
    group = dist.group.WORLD
    name = register_group(group)
    t, k, e, h = args.tokens, args.top_k, args.experts, args.hidden
    hidden = torch.randn(t, h, device=device, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.stack([torch.randperm(e, device=device)[:k] for _ in range(t)])
    weights = torch.rand(t, k, device=device, requires_grad=True)
    slots = ids.to(torch.int32)
    out = torch.empty_like(hidden)
    ep = AllToAllDispatcher(e, group)
    local = LocalDispatcher(e)
    plan = ep.plan(ids)
    dispatched = ep.dispatch(hidden, ids, weights, plan)
    expert_out = dispatched.tokens.detach().clone().requires_grad_()
    pieces = {
        "aten add (one launch)": lambda: hidden.detach() + 1,
        "dist.all_to_all_single [T, H]": lambda: dist.all_to_all_single(out, hidden.detach(), [t], [t], group=group),
        "automoe all_to_all, one tensor": lambda: all_to_all([hidden], [t], [t], name),
        "automoe all_to_all, hidden + slots + weights": lambda: all_to_all([hidden, slots, weights], [t], [t], name),
        "AllToAllDispatcher.plan": lambda: ep.plan(ids),
        "AllToAllDispatcher.dispatch (plan given)": lambda: ep.dispatch(hidden, ids, weights, plan),
        "AllToAllDispatcher.combine": lambda: ep.combine(expert_out, dispatched),
        "LocalDispatcher.dispatch": lambda: local.dispatch(hidden, ids, weights),
    }
    owns = torch.ones(t, 1, dtype=torch.bool, device=device)
    flat_ids = ids.reshape(-1)
    sizes = torch.zeros(3, dtype=torch.int64, device=device)
    pieces.update({
        "plan part: pinned buffer + copy + event": lambda: start_to_host(sizes),
        "plan part: stable sort of the pairs (bool [T])": lambda: torch.sort(~owns.t().reshape(-1), stable=True),
        "plan part: token_major (combine CSR)": lambda: token_major(owns, torch.arange(t, device=device)[:, None], t),
        "expert_rows part: stable sort int64 [T*k]": lambda: torch.sort(flat_ids, stable=True),
        "expert_rows part: stable sort uint8 [T*k]": lambda: torch.sort(flat_ids.to(torch.uint8), stable=True),
        "cumsum int64 [T*k]": lambda: torch.cumsum(flat_ids, 0),
    })
    results = {piece: host_us(fn, device, args.reps) for piece, fn in pieces.items()}
    for piece, us in results.items():
        print(f"{us:9.1f} us  {piece}", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.reps):
            ep.plan(ids)
    plan_ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(f"the plan's ops, {args.reps} calls:\n{plan_ops}", flush=True)
    dist.destroy_process_group()
    return {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "shape": {"tokens": t, "top_k": k, "experts": e, "hidden": h}, "reps": args.reps,
            "host_us_per_call": results, "plan_ops": plan_ops}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = measure(args)
    result["command"] = "python benchmarks/ep_host_costs.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ep_host_costs.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
