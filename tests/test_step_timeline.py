"""benchmarks/step_timeline.py's trace analysis on a hand-made trace: GPU idle gaps, the CPU op that launched
the kernel after each gap, blocking CUDA calls, and kernel time by launching op."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "step_timeline", Path(__file__).resolve().parents[1] / "benchmarks" / "step_timeline.py")
step_timeline = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(step_timeline)


def op(name, ts, dur, tid=1):
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}


def launch(corr, ts, name="cudaLaunchKernel", dur=2, tid=1):
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur, "tid": tid,
            "args": {"correlation": corr}}


def kernel(name, corr, ts, dur):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": 7, "args": {"correlation": corr}}


def test_gaps_are_found_and_attributed_to_the_launching_op():
    events = [
        op("forward", 0, 1000), op("aten::mm", 10, 5), op("RMSNormFunction", 400, 30), op("aten::add", 900, 20),
        launch(1, 12), launch(2, 405), launch(3, 905),
        launch(9, 300, name="cudaStreamSynchronize", dur=90),
        kernel("gemm", 1, 20, 300),          # busy 20..320
        kernel("rms_fwd", 2, 420, 100),      # gap 100 us before it, launched from RMSNormFunction
        kernel("overlapping", 3, 430, 200),  # overlaps: busy until 630, no gap
    ]
    report = step_timeline.analyse({"traceEvents": events}, min_gap_us=20)
    assert report["gpu_span_ms"] == pytest.approx(0.610)
    assert report["gpu_busy_ms"] == pytest.approx(0.510)
    assert report["idle_ms"] == pytest.approx(0.100)
    assert report["num_gaps_over_min"] == 1
    gap = report["largest_gaps"][0]
    assert (gap["gap_us"], gap["after"], gap["before"]) == (100, "gemm", "rms_fwd")
    assert gap["launched_from"] == ["forward", "RMSNormFunction"]
    assert report["gaps_by_launching_op"] == [["forward > RMSNormFunction", 1, pytest.approx(0.1)]]
    assert report["blocking_calls"] == [["cudaStreamSynchronize", 1, pytest.approx(0.09)]]
    by_kernel = {name: ms for name, _, ms in report["kernels_by_launching_op"]}
    assert by_kernel["gemm <- forward > aten::mm"] == pytest.approx(0.3)
    assert by_kernel["overlapping <- forward > aten::add"] == pytest.approx(0.2)
    assert "rms_fwd <- forward > RMSNormFunction" in by_kernel


def test_gaps_below_the_threshold_count_as_idle_but_are_not_listed():
    events = [op("f", 0, 100), launch(1, 1), launch(2, 2), kernel("a", 1, 10, 10), kernel("b", 2, 30, 10)]
    report = step_timeline.analyse({"traceEvents": events}, min_gap_us=20)
    assert report["idle_ms"] == pytest.approx(0.010)
    assert report["num_gaps_over_min"] == 0 and report["largest_gaps"] == []
