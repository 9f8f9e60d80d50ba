"""The bench's table (stdout), its raw JSON and a PNG bar chart."""

from __future__ import annotations

import json
import math
from pathlib import Path


def main_run(column: dict) -> dict | None:
    runs = column.get("runs") or []
    return runs[0] if runs and not runs[0].get("oom") else None


def longest(column: dict) -> tuple[int | None, float | None]:
    """The longest batch-1 seq that trained, with its step TPS."""
    ok = [r for r in column.get("runs", []) if not r.get("oom") and r["batch"] == 1]
    if not ok:
        return None, None
    best = max(ok, key=lambda r: r["seq"])
    return best["seq"], best["step_tps"]


def mfu(run: dict, flops_per_token: float, dense_tflops: float) -> float:
    if not dense_tflops or math.isnan(dense_tflops):
        return float("nan")
    return flops_per_token * run["step_tps"] / (dense_tflops * 1e12)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def table(result: dict) -> str:
    cols = result["columns"]
    fpt, dense = result["flops_per_token"], result.get("dense_tflops")
    head = ["column", "step TPS", "fwd+bwd TPS", "peak GiB", "floor GiB", "fwd+loss ms", "bwd ms", "opt ms",
            "MFU", "loss@1", "longest seq (TPS)"]
    rows = [head]
    for col in cols:
        run = main_run(col)
        seq, tps = longest(col)
        if run is None:
            rows.append([col["label"], "failed" if col.get("error") else "OOM"] + ["-"] * 8 + [_fmt(seq, "d")])
            continue
        rows.append([
            col["label"], _fmt(run["step_tps"], ",.0f"), _fmt(run["fwd_bwd_tps"], ",.0f"),
            _fmt(run.get("peak_gib"), ".1f"), _fmt(run.get("floor_gib"), ".1f"), _fmt(run["fwd_loss_ms"], ".1f"),
            _fmt(run["bwd_ms"], ".1f"), _fmt(run["optimizer_ms"], ".1f"), _fmt(mfu(run, fpt, dense), ".1%"),
            _fmt(run["losses"][0], ".4f"), f"{_fmt(seq, 'd')} ({_fmt(tps, ',.0f')})",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines += ["", *ratios(result), *gpu_state_lines(result), "", *sweep_lines(result), *column_notes(result)]
    return "\n".join(lines)


def ratios(result: dict) -> list[str]:
    """Each automoe column against each peer, and each compiled automoe column against the eager ones, at the main
    seq and at every sweep seq both trained."""
    cols = result["columns"]
    ours = [c for c in cols if c["column"].startswith("automoe")]
    peers = [c for c in cols if not c["column"].startswith("automoe")]
    eager = [c for c in cols if c["column"] == "automoe"]
    pairs = [(m, p) for m in ours for p in peers] + [(m, e) for m in ours if m["column"] == "automoe+compile"
                                                      for e in eager]
    lines = []
    for mine, peer in pairs:
        a, b = main_run(mine), main_run(peer)
        if a is None or b is None:
            continue
        line = (f"{mine['label']} / {peer['label']}: step TPS x{a['step_tps'] / b['step_tps']:.2f}, "
                f"fwd+bwd TPS x{a['fwd_bwd_tps'] / b['fwd_bwd_tps']:.2f}")
        if "peak_gib" in a and "peak_gib" in b:
            line += f", peak {a['peak_gib']:.1f} vs {b['peak_gib']:.1f} GiB"
        both = {r["seq"]: r for r in peer["runs"] if r["batch"] == 1 and not r.get("oom")}
        sweep = [(r["seq"], r["step_tps"] / both[r["seq"]]["step_tps"]) for r in mine["runs"]
                 if r["batch"] == 1 and not r.get("oom") and r["seq"] in both and r is not a]
        if sweep:
            line += "; sweep " + ", ".join(f"{s}: x{x:.2f}" for s, x in sweep)
        lines.append(line)
    return lines


def gpu_state_lines(result: dict) -> list[str]:
    """The GPU's clock and power during each column's timed steps at the main seq (power-capped steps differ)."""
    cells = [f"{c['label']} {r['sm_clock_mhz']:.0f} MHz {r['power_w']:.0f} W (power-capped {r['power_capped_steps']})"
             for c in result["columns"] if (r := main_run(c)) and "sm_clock_mhz" in r]
    return ["GPU state read after each timed step (median): " + "; ".join(cells)] if cells else []


def sweep_seqs(result: dict) -> list[int]:
    """The batch-1 sequence lengths any column ran."""
    return sorted({r["seq"] for c in result["columns"] for r in c["runs"] if r["batch"] == 1})


def sweep_lines(result: dict) -> list[str]:
    seqs = sweep_seqs(result)
    if len(seqs) < 2:
        return []
    lines = ["step TPS by seq (batch 1): " + ", ".join(c["label"] for c in result["columns"])]
    for seq in seqs:
        cells = []
        for col in result["columns"]:
            run = next((r for r in col["runs"] if r["seq"] == seq and r["batch"] == 1), None)
            cells.append("-" if run is None else "OOM" if run.get("oom") else f"{run['step_tps']:,.0f}")
        lines.append(f"  {seq:>7}: " + " | ".join(cells))
    return lines


def column_notes(result: dict) -> list[str]:
    """What a column says about how it ran (the nemo column: its path, BackendConfig, loss, and what failed)."""
    notes = [line for col in result["columns"] for line in col.get("notes", [])]
    return ["", *notes] if notes else []


def write(result: dict, out_dir: Path, plot: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{result['workload']}-seq{result['args']['seq']}"
    paths = [out_dir / f"{stem}.json"]
    paths[0].write_text(json.dumps(result, indent=1))
    if plot:
        paths.append(_plot(result, out_dir / f"{stem}.png"))
    return paths


def _plot(result: dict, path: Path) -> Path:
    """Step TPS by column at the main seq; beside it, where the run swept two or more lengths, TPS by length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = result["columns"]
    sweep = len(sweep_seqs(result)) > 1  # one sequence length is no sweep: no panel for it
    fig, axes = plt.subplots(1, 1 + sweep, figsize=(12 if sweep else 6.5, 4.5), squeeze=False)
    left = axes[0][0]
    labels = [c["label"] for c in cols]
    values = [(main_run(c) or {}).get("step_tps", 0) for c in cols]
    left.bar(range(len(cols)), values, color=["#2a7", "#888", "#c84", "#48c"][: len(cols)])
    left.set_xticks(range(len(cols)), labels, rotation=12, fontsize=8)
    left.set_ylabel("step TPS (tokens / s)")
    left.set_title(f"{result['workload']}, seq {result['args']['seq']}, batch {result['args']['batch']}")
    for i, v in enumerate(values):
        left.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    if sweep:
        right = axes[0][1]
        for col in cols:
            pts = [(r["seq"], r["step_tps"]) for r in col["runs"] if r["batch"] == 1 and not r.get("oom")]
            if pts:
                right.plot(*zip(*pts, strict=True), marker="o", label=col["label"])
        right.set_xscale("log", base=2)
        right.set_xlabel("sequence length (batch 1)")
        right.set_ylabel("step TPS")
        right.set_title("sequence sweep, batch 1 (to --max-seq or the first OOM)")
        if right.lines:
            right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
