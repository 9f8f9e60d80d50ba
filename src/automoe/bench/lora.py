"""`automoe bench --lora`: LoRA fine-tuning of a whole MoE model on one GPU, automoe + peft against Transformers v5
+ peft, the same LoraConfig (r, alpha 2r, q/k/v/o and both expert tensors through `target_parameters`) in one run.

Three processes, one after the other, each printing its figures as it measures them (an OOM or a crash in one
leaves the others' figures):
  v5 + peft       the workload's layers at --seq (the issue expects an OOM at 48 layers), then fewer layers
                  (LAYER_TRIALS) until one fits: that layer count's step TPS, peak and peak above the weights;
  automoe + peft  at the layer count v5 fitted, --seq, no checkpointing: the like-for-like comparison;
  automoe + peft  the workload's layers at --seq without activation checkpointing, then with it at --seq and
                  doubling up to --max-seq (the longest sequence it trains).
Weights are built on the device with `no_init_weights` and filled by one normal_ per tensor (transformers'
per-module init is skipped), the base in bf16; peft makes the adapters fp32, as it does by default.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .measure import GIB, is_oom, measure, release, tokens_for
from .workload import make_config

LAYER_TRIALS = (40, 32, 24, 16, 12, 8)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ATTENTION, target_parameters=EXPERTS)


def random_init_(model: torch.nn.Module, seed: int, std: float) -> None:
    """One normal_ per matrix, ones for norm weights, zeros for other vectors: fast on 30B parameters."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, std, generator=generator)
            else:
                param.fill_(1.0 if "norm" in name else 0.0)


def build(column: str, config, device: torch.device, args: argparse.Namespace):
    """The column's peft model: bf16 base built on `device` without transformers' init, LoRA from peft."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with device, no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 experts_implementation="grouped_mm")
    random_init_(model, args.seed, config.initializer_range)
    if column == "automoe":
        from ..optimize import optimize_model
        from ..options import AutoMoEOptions

        model = optimize_model(model, AutoMoEOptions.coerce({"kernels": args.kernels, "fused_loss": True}))
    with device:
        return get_peft_model(model, lora_config(args.rank))


def keep_layers(model, layers: int) -> None:
    """Drop the decoder layers past `layers` (and free them): fewer layers without building the model again."""
    inner = model.get_base_model().model
    del inner.layers[layers:]
    config = model.get_base_model().config
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# activation checkpointing modes, cheapest recomputation first (see set_checkpointing)
AC_MODES = ("off", "attention", "layer", "sac")


def set_checkpointing(model, mode: str) -> None:
    """Activation checkpointing of the decoder layers, in place; `mode` one of AC_MODES:
      attention  only each layer's attention module is recomputed (its peft LoRA included); the MoE block is not
                 checkpointed: its fused experts already keep only their input, the rows, the gate/up output and
                 the rank-r products, and nothing is rerouted;
      layer      each whole layer under a plain non-reentrant checkpoint, as `automoe finetune` checkpoints on one
                 process: the recomputation reruns the router, which on one device routes as the forward did;
      sac        each whole layer under the distributed setup's selective checkpoint ("full": the router's top-k
                 kept, everything else recomputed). Its dispatch mode runs Python on every op of the forward and of
                 the recomputation (on CPU its forward takes 2.6x a plain one), the likely cause of the x2.4 step
                 measured with it on the H200 where a recomputed forward should cost x1.3; it is the mode expert
                 parallelism needs (no all-to-all is rerun)."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing {mode!r}: choose one of {AC_MODES}")
    from torch.utils.checkpoint import checkpoint

    from ..distributed.parallelize import checkpoint_function, decoder_layers

    plain = functools.partial(checkpoint, use_reentrant=False)
    for layer in decoder_layers(model):
        layer.gradient_checkpointing = mode in ("layer", "sac")
        layer._gradient_checkpointing_func = checkpoint_function("full") if mode == "sac" else plain
        attention = layer.self_attn
        attention.__dict__.pop("forward", None)
        if mode == "attention":
            attention.forward = functools.partial(plain, functools.partial(type(attention).forward, attention))


def optimizer_for(column: str, model, kernels: str) -> torch.optim.Optimizer:
    """automoe: its AdamW applied in backward (no gradient buffers held); v5: torch's fused AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    if column == "automoe":
        from ..kernels import AdamW

        return AdamW(params, lr=1e-5, weight_decay=0.01, kernels=kernels, in_backward=True)
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=params[0].is_cuda)


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated() / GIB if device.type == "cuda" else None


def try_measure(model, optimizer, tokens, warmup: int, steps: int) -> dict:
    try:
        return measure(model, optimizer, tokens, warmup, steps)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_oom(error):
            raise
        release(optimizer)
        return {"seq": tokens.shape[1], "batch": 1, "oom": True, "error": str(error).splitlines()[0]}


def describe(run: dict) -> str:
    if run.get("oom"):
        return "OOM"
    text = f"{run['step_tps']:,.0f} step TPS ({run['step_ms']:.0f} ms)"
    if run.get("peak_gib") is not None:
        text += f", peak {run['peak_gib']:.1f} GiB, {run['peak_gib'] - run['weights_gib']:.1f} GiB above the weights"
    return text


class Worker:
    """One column's process: measures in order, prints and saves each figure as it comes."""

    def __init__(self, column: str, args: argparse.Namespace, out: Path) -> None:
        self.column, self.args, self.out = column, args, out
        self.device = torch.device(args.device)
        self.config = make_config(args.workload, args.layers)
        self.result: dict = {"column": column, "runs": []}

    def run_one(self, model, optimizer, seq: int, checkpointing: str, warmup: int, steps: int) -> dict:
        tokens = tokens_for(self.config.vocab_size, 1, seq, self.args.seed, self.device)
        run = try_measure(model, optimizer, tokens, warmup, steps)
        run.update(layers=self.config.num_hidden_layers, checkpointing=checkpointing,
                   weights_gib=self.weights_gib)
        self.result["runs"].append(run)
        self.out.write_text(json.dumps(self.result))
        print(f"[{self.column}+peft] {run['layers']} layers, seq {seq}, activation checkpointing {checkpointing}: "
              f"{describe(run)}", flush=True)
        return run

    def build(self, layers: int):
        self.config.num_hidden_layers = layers
        torch.manual_seed(self.args.seed)
        model = build(self.column, self.config, self.device, self.args)
        self.weights_gib = allocated_gib(self.device)
        return model

    def v5(self) -> None:
        """The workload's layers, then fewer until one fits at --seq."""
        model = self.build(self.config.num_hidden_layers)
        for layers in [self.config.num_hidden_layers] + [n for n in LAYER_TRIALS if n < self.config.num_hidden_layers]:
            if layers < self.config.num_hidden_layers:
                keep_layers(model, layers)
                self.weights_gib = allocated_gib(self.device)
            run = self.run_one(model, optimizer_for("v5", model, self.args.kernels), self.args.seq, "off",
                               self.args.warmup, self.args.steps)
            if not run.get("oom"):
                return

    def automoe_full(self) -> None:
        """The workload's layers at --seq without checkpointing and in the `attention` and `layer` modes, then
        `layer` doubling the sequence up to --max-seq (the longest sequence it trains)."""
        model = self.build(self.config.num_hidden_layers)
        optimizer = optimizer_for("automoe", model, self.args.kernels)
        for mode in ("off", "attention", "layer"):
            set_checkpointing(model, mode)
            self.run_one(model, optimizer, self.args.seq, mode, self.args.warmup, self.args.steps)
        seq = 2 * self.args.seq
        while seq <= self.args.max_seq:
            if self.run_one(model, optimizer, seq, "layer", 1, 2).get("oom"):
                return
            seq *= 2

    def automoe_layers(self, layers: int) -> None:
        model = self.build(layers)
        self.run_one(model, optimizer_for("automoe", model, self.args.kernels), self.args.seq, "off",
                     self.args.warmup, self.args.steps)


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m automoe.bench.lora")
    parser.add_argument("--job", required=True, choices=["v5", "automoe_full", "automoe_layers"])
    parser.add_argument("--match-layers", type=int, default=0)
    parser.add_argument("--args", required=True)
    parser.add_argument("--out", required=True)
    ns = parser.parse_args(argv)
    args = argparse.Namespace(**json.loads(ns.args))
    if args.device == "cuda":
        torch.cuda.set_device(0)
    worker = Worker("v5" if ns.job == "v5" else "automoe", args, Path(ns.out))
    if ns.job == "automoe_layers":
        worker.automoe_layers(ns.match_layers)
    else:
        getattr(worker, ns.job)()
    return 0


def run_job(job: str, args: argparse.Namespace, folder: Path, match_layers: int = 0) -> dict:
    keys = ("workload", "layers", "seq", "steps", "warmup", "max_seq", "kernels", "device", "seed", "rank")
    out = folder / f"lora-{job}.json"
    cmd = [sys.executable, "-m", "automoe.bench.lora", "--job", job, "--match-layers", str(match_layers),
           "--args", json.dumps({k: getattr(args, k) for k in keys}), "--out", str(out)]
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    proc = subprocess.run(cmd, env=env)
    result = json.loads(out.read_text()) if out.exists() else {"runs": []}
    if proc.returncode:
        result["error"] = f"exit {proc.returncode}"
        print(f"[{job}] exited with {proc.returncode}", flush=True)
    return result


def fitted(result: dict) -> dict | None:
    return next((r for r in result["runs"] if not r.get("oom")), None)


def summary(v5: dict, full: dict, matched: dict, seq: int) -> list[str]:
    """The issue's figures, each beside its target."""
    lines = []
    v5_runs = {r["layers"]: r for r in v5["runs"]}
    top = max(v5_runs, default=None)
    if top is not None:
        lines.append(f"v5 + peft, {top} layers, seq {seq}: {describe(v5_runs[top])}")
    at_seq = [r for r in full["runs"] if r["seq"] == seq]
    for run in at_seq:
        target = "target >= 12,000 step TPS" if run["checkpointing"] == "off" else "target peak <= 70 GiB"
        lines.append(f"automoe + peft, {run['layers']} layers, seq {seq}, activation checkpointing "
                     f"{run['checkpointing']}: {describe(run)} ({target} in some configuration)")
    longest = [r for r in full["runs"] if r["checkpointing"] == "layer"]
    if longest:
        trained = [r["seq"] for r in longest if not r.get("oom")]
        lines.append(f"automoe + peft longest sequence (layer checkpointing, batch 1): {max(trained, default='none')} "
                     "(target >= 32768)")
    v5_fit, ours = fitted(v5), fitted(matched)
    if v5_fit and ours:
        lines.append(f"at {v5_fit['layers']} layers (the most v5 + peft fits at seq {seq}): "
                     f"step TPS x{ours['step_tps'] / v5_fit['step_tps']:.2f} (target >= 2)")
        if v5_fit.get("peak_gib") is not None:
            ratio = (ours["peak_gib"] - ours["weights_gib"]) / (v5_fit["peak_gib"] - v5_fit["weights_gib"])
            lines.append(f"  peak above the weights x{ratio:.2f} of v5 + peft's (target <= 0.5)")
    return lines


def run_lora(args: argparse.Namespace) -> int:
    """The driver: three worker processes, then the summary and one JSON under --out."""
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    v5 = run_job("v5", args, folder)
    v5_fit = fitted(v5)
    layers = v5_fit["layers"] if v5_fit else min(LAYER_TRIALS)
    matched = run_job("automoe_layers", args, folder, match_layers=layers)
    full = run_job("automoe_full", args, folder)  # last: its longest sequences take the longest
    lines = summary(v5, full, matched, args.seq)
    print("\n".join(["", *lines]))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%S")
    path = folder / f"lora-{args.workload}-{stamp}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "device": device_name(args.device),
                                "rank": args.rank, "v5+peft": v5, "automoe+peft": full,
                                "automoe+peft matched": matched, "summary": lines}, indent=1))
    print(f"wrote {path}")
    return 0


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else device


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
