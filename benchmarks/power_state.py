"""Does the GPU's power cap move a bench step? One column at one sequence length: steps back to back, then steps
each after an idle pause, with the SM clock, board power, temperature and throttle reasons (NVML) after each.

    python benchmarks/power_state.py --column automoe --seq 32768     # needs nvidia-ml-py
"""

from __future__ import annotations

import argparse
import statistics
import time

import pynvml
import torch

from automoe.bench.columns import ColumnSpec, build_model, build_optimizer
from automoe.bench.measure import tokens_for, train_step
from automoe.bench.workload import make_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--column", default="automoe", choices=["automoe", "v5", "v5+liger"])
    p.add_argument("--workload", default="qwen3-30b-a3b-l8")
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--idle-s", type=float, default=2.0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    pynvml.nvmlInit()
    gpu = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(0).uuid}")

    def state() -> str:
        return (f"{pynvml.nvmlDeviceGetClockInfo(gpu, pynvml.NVML_CLOCK_SM)} MHz, "
                f"{pynvml.nvmlDeviceGetPowerUsage(gpu) / 1000:.0f} W, {pynvml.nvmlDeviceGetTemperature(gpu, 0)} C, "
                f"throttle reasons {pynvml.nvmlDeviceGetCurrentClocksEventReasons(gpu):#x}")

    config = make_config(args.workload)
    torch.manual_seed(0)
    spec = ColumnSpec(args.column, optimizer="automoe" if args.column == "automoe" else "torch")
    model = build_model(spec, config, torch.device("cuda"))
    optimizer = build_optimizer(spec, model)
    tokens = tokens_for(config.vocab_size, 1, args.seq, 0, torch.device("cuda"))

    def step() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        train_step(model, optimizer, tokens)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    for _ in range(3):
        step()
    back_to_back, rested = [], []
    for _ in range(args.steps):
        back_to_back.append(step())
        print(f"back to back {back_to_back[-1]:.1f} ms; after it {state()}", flush=True)
    for _ in range(args.steps):
        time.sleep(args.idle_s)
        before = state()
        rested.append(step())
        print(f"after {args.idle_s:.0f} s idle {rested[-1]:.1f} ms; before it {before}; after it {state()}", flush=True)
    print(f"{spec.label} seq {args.seq}: back to back median {statistics.median(back_to_back):.1f} ms, "
          f"after idle median {statistics.median(rested):.1f} ms")


if __name__ == "__main__":
    main()
