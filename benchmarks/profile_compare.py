"""Two columns' profiled bench steps side by side: phase times, kernel time by kind, the top kernels of each, and
the aten ops whose device time differs most. Reads what `automoe bench --profile DIR` wrote (profile-KEY.json, one
step at --seq, and the bench JSON).

    python benchmarks/profile_compare.py DIR --a automoe-automoe --b nemo

Times are device (GPU) time in ms for one step; on CPU (no device time) the ops' self host time stands in.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# first match wins: the grouped GEMMs before the plain ones, attention before its GEMM-like kernels
KINDS = (
    ("grouped GEMM (experts)", r"group|grouped_mm|moe"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("cross-entropy / softmax", r"cross_entropy|crossentropy|softmax|nll_loss|logsumexp|linear_ce|cce"),
    ("optimizer", r"adam|foreach|multi_tensor|fused_sgd"),
    ("norm", r"rms|norm"),
    ("GEMM", r"gemm|cutlass|cublas|xmma|nvjet|sm90_|sm80_|matmul|mm_"),
    ("copy / cast / index / sort", r"copy|memcpy|memset|index|scatter|gather|cat_|sort|cumsum|histc|bincount|topk"),
    ("other triton", r"triton"),
)


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, low)), "other elementwise / reduce")


def load(folder: Path, key: str) -> tuple[list[dict], str]:
    ops = json.loads((folder / f"profile-{key}.json").read_text())
    field = "self_device_us" if any(op["self_device_us"] for op in ops) else "self_cpu_us"
    return ops, field


def kernels(ops: list[dict], field: str) -> list[dict]:
    """The rows that hold time of their own on the device (kernels, copies); on CPU the leaf aten ops."""
    return [op for op in ops if op[field] > 0 and (field == "self_device_us" or op["name"].startswith("aten::"))]


def by_kind(ops: list[dict], field: str) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for op in kernels(ops, field):
        total[kind(op["name"])] += op[field] / 1e3
    return total


def phases(folder: Path, key: str) -> dict | None:
    for path in sorted(folder.glob("bench-*.json")):
        for col in json.loads(path.read_text())["columns"]:
            runs = [r for r in col.get("runs", []) if not r.get("oom")]
            if col.get("key") == key and runs:
                return {**runs[0], "label": col["label"], "notes": col.get("notes", [])}
    return None


def report(folder: Path, a: str, b: str, top: int) -> list[str]:
    (ops_a, field), (ops_b, _) = load(folder, a), load(folder, b)
    lines = [f"profiled step, {a} | {b} ({'device' if field == 'self_device_us' else 'host'} ms)"]
    pa, pb = phases(folder, a), phases(folder, b)
    if pa and pb:
        for name in ("step_ms", "fwd_loss_ms", "bwd_ms", "optimizer_ms", "peak_gib"):
            if name in pa and name in pb:
                lines.append(f"  timed {name:<14} {pa[name]:>9.1f} | {pb[name]:>9.1f}")
        lines += [f"  {note}" for note in pb["notes"]]
    ka, kb = by_kind(ops_a, field), by_kind(ops_b, field)
    lines.append(f"  {'kernel time by kind':<30} {a:>12} {b:>12} {'b - a':>9}")
    for k in sorted(set(ka) | set(kb), key=lambda k: -max(ka.get(k, 0), kb.get(k, 0))):
        lines.append(f"  {k:<30} {ka.get(k, 0):>12.2f} {kb.get(k, 0):>12.2f} {kb.get(k, 0) - ka.get(k, 0):>+9.2f}")
    lines.append(f"  {'all kernels':<30} {sum(ka.values()):>12.2f} {sum(kb.values()):>12.2f} "
                 f"{sum(kb.values()) - sum(ka.values()):>+9.2f}")
    for key, ops in ((a, ops_a), (b, ops_b)):
        lines.append(f"top kernels, {key} (ms, calls):")
        for op in sorted(kernels(ops, field), key=lambda op: -op[field])[:top]:
            lines.append(f"  {op[field] / 1e3:>8.2f} {op['calls']:>5}  {op['name'][:110]}")
    incl = "device_us" if field == "self_device_us" else "cpu_us"
    aten_a = {op["name"]: op for op in ops_a if op["name"].startswith("aten::")}
    aten_b = {op["name"]: op for op in ops_b if op["name"].startswith("aten::")}
    names = sorted(set(aten_a) | set(aten_b),
                   key=lambda n: -abs(aten_b.get(n, {}).get(incl, 0) - aten_a.get(n, {}).get(incl, 0)))
    lines.append(f"aten ops whose time (incl. children) differs most, ms and calls: {a} | {b}")
    for n in names[:top]:
        oa, ob = aten_a.get(n, {}), aten_b.get(n, {})
        lines.append(f"  {oa.get(incl, 0) / 1e3:>8.2f} {oa.get('calls', 0):>5} | {ob.get(incl, 0) / 1e3:>8.2f} "
                     f"{ob.get('calls', 0):>5}  {n}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="the --profile folder of an `automoe bench` run (and its --out)")
    p.add_argument("--a", default="automoe-automoe", help="column key of the first profile")
    p.add_argument("--b", default="nemo", help="column key of the second profile")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    missing = [k for k in (args.a, args.b) if not (args.folder / f"profile-{k}.json").exists()]
    if missing:
        print(f"profile_compare: no profile-{missing[0]}.json in {args.folder} (did that column run?)", file=sys.stderr)
        return 1
    print("\n".join(report(args.folder, args.a, args.b, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
