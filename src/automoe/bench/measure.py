"""Timing one column: warm-up steps, then medians of forward+loss, backward and optimizer time per step,
peak memory, and the weights+optimizer floor. Device events mark the phases; one sync per step."""

from __future__ import annotations

import gc
import statistics
import time

import torch
import torch.distributed as dist

GIB = 1024**3


class _Clock:
    """CUDA events on a GPU, the host clock on CPU (where every op has finished when it returns)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def spans_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def tokens_for(vocab: int, batch: int, seq: int, seed: int, device: torch.device) -> torch.Tensor:
    """The same random ids for every column: drawn on the CPU from `seed`, then moved."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator).to(device)


def _max_over_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class GpuState:
    """SM clock, board power and power-cap throttling, read through NVML after each timed step.

    Why: at long sequences the H100 here holds its 700 W cap and clocks down to 1.5-1.7 GHz, so step times move by
    a few percent with the GPU's power state (benchmarks/results/power_cap_seq32768_h100_2026-11-23.log); every
    column reports the state it ran in. Empty where NVML (nvidia-ml-py) is not importable."""

    SW_POWER_CAP = 0x4  # nvmlClocksThrottleReasonSwPowerCap

    def __init__(self, device: torch.device) -> None:
        self.samples: list[tuple[int, float, bool]] = []
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = torch.cuda.get_device_properties(device).uuid
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            self.nvml = pynvml
        except Exception:  # no NVML library or no matching device: the result simply has no GPU state
            pass

    def sample(self) -> None:
        if self.handle is None:
            return
        nvml = self.nvml
        reasons = nvml.nvmlDeviceGetCurrentClocksEventReasons(self.handle)
        self.samples.append((nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_SM),
                             nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000, bool(reasons & self.SW_POWER_CAP)))

    def summary(self) -> dict:
        if not self.samples:
            return {}
        clocks, watts, capped = zip(*self.samples, strict=True)
        return {"sm_clock_mhz": statistics.median(clocks), "power_w": statistics.median(watts),
                "power_capped_steps": f"{sum(capped)}/{len(capped)}"}


def train_step(model, optimizer, tokens: torch.Tensor) -> None:
    """One step as the bench trains it (labels = tokens), for the profiled and traced steps outside `measure`."""
    model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(model, optimizer, tokens: torch.Tensor, warmup: int, steps: int) -> dict:
    """Train `warmup + steps` steps on `tokens` (labels = tokens); medians over the last `steps`."""
    device = tokens.device
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    phases, losses = [], []
    gpu = GpuState(device)
    for i in range(warmup + steps):
        clock = _Clock(device)
        clock.mark()
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        clock.mark()
        loss.backward()
        clock.mark()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark()
        phases.append(clock.spans_ms())
        if i >= warmup:
            gpu.sample()
        losses.append(loss.detach().float())
        del loss
    timed = phases[warmup:]
    fwd, bwd, opt = (statistics.median(p[i] for p in timed) for i in range(3))
    step = statistics.median(sum(p) for p in timed)
    n = tokens.numel()
    result = {
        "seq": tokens.shape[1], "batch": tokens.shape[0], "steps": steps, "warmup": warmup,
        "step_ms": step, "fwd_loss_ms": fwd, "bwd_ms": bwd, "optimizer_ms": opt,
        "step_tps": n / step * 1e3, "fwd_bwd_tps": n / (fwd + bwd) * 1e3,
        "losses": [float(x) for x in torch.stack(losses).cpu()],
        **gpu.summary(),
    }
    if device.type == "cuda":
        gc.collect()
        result["peak_gib"] = _max_over_ranks(torch.cuda.max_memory_allocated() / GIB, device)
        result["floor_gib"] = _max_over_ranks(torch.cuda.memory_allocated() / GIB, device)
    return result


def is_oom(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text


def release(optimizer) -> None:
    """After an OOM: drop grads and cached blocks so the process can report and exit cleanly."""
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def median_cuda_ms(fn, reps: int = 20, warmup: int = 5) -> float:
    """Median GPU time of `fn()` over `reps` calls after `warmup`, each between two events and a sync."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        clock = _Clock(torch.device("cuda"))
        clock.mark()
        fn()
        clock.mark()
        times.append(clock.spans_ms()[0])
    return statistics.median(times)


def dense_matmul_tflops(device: torch.device, size: int = 8192, reps: int = 20) -> float:
    """bf16 [size x size] @ [size x size] on random data, median of `reps` timed products."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    return 2 * size**3 / (median_cuda_ms(lambda: a @ b, reps=reps, warmup=3) * 1e-3) / 1e12
