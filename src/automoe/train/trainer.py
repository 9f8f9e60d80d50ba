"""The training loop of `automoe finetune`: data and recipe checks first, then train, evaluate, export.

Loss is the mean over every trained token of the global batch (all micro-batches, all ranks), so one
process and N processes, or grad_accum 1 and 4, follow the same curve.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import Recipe, RecipeError
from .data import (
    IGNORE,
    BatchPlan,
    Encoder,
    collate,
    eval_batches,
    load_samples,
    micro_batches,
    pack,
    read_rows,
    resolve_path,
)
from .evaluate import eval_pairs, exact_match
from .lora import add_lora, save_adapter_and_merge
from .metrics import MetricsSink, flops_per_token, peak_flops, peak_memory_gib, plot_losses, progress_bar
from .model import build_model, build_tokenizer, export_hf
from .runtime import Runtime, all_sum, barrier, clip_grad_norm, init_runtime, shutdown
from .state import clean_partial, complete_checkpoints, load_checkpoint, save_checkpoint


def lr_lambda(recipe: Recipe, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine / linear decay to min_lr_ratio, or constant."""
    s = recipe.schedule

    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.decay == "constant":
            return 1.0
        progress = min(1.0, (step - s.warmup_steps) / max(1, total_steps - s.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.decay == "cosine" else 1 - progress
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape

    return factor


def make_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = recipe.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.betas[0], weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], denominator: float) -> tuple[Any, float]:
    """(loss to backpropagate, summed cross-entropy over the trained tokens).

    The model's own loss path (so automoe's fused linear+cross-entropy runs when `fused_loss` is on): labels
    are already shifted, and `num_items_in_batch` makes it sum / denominator. HF adds the router aux loss
    (config.router_aux_loss_coef x aux) when the config asks for router logits; it is left out of the sum."""
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=labels,
                shift_labels=labels, num_items_in_batch=denominator, use_cache=False)
    ce = out.loss.detach()
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        ce = ce - model.config.router_aux_loss_coef * aux.detach().to(ce.device)
    return out.loss, ce.item() * denominator


def trained_tokens(rows: list) -> int:
    return sum(sum(label != IGNORE for label in s.labels) for row in rows for s in row)


def real_tokens(rows: list) -> int:
    return sum(len(s.input_ids) for row in rows for s in row)


@torch.no_grad()
def validation_loss(model, rows, recipe: Recipe, rt: Runtime, pad_id: int, micro: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for batch_rows in eval_batches(rows, micro, rt.dp_rank, rt.dp_size):
        batch = to_device(collate(batch_rows, recipe.data.max_seq_len, pad_id), rt.device)
        total += model_loss(model, batch, 1.0)[1]
        count += float((batch["labels"] != IGNORE).sum())
    model.train(was_training)
    total, count = all_sum([total, count], rt)
    return total / max(count, 1.0)


def optimizer_step(model, optimizer, rows: list, micro: int, recipe: Recipe, rt: Runtime, pad_id: int):
    """One optimizer step on the global batch `rows`: (mean loss per trained token, gradient norm).

    Each micro-batch's loss is its summed cross-entropy over the step's trained-token count (all ranks, all
    micro-batches); FSDP2 averages gradients over the data-parallel ranks, hence the dp_size factor."""
    t = recipe.train
    n_trained = max(trained_tokens(rows), 1)
    local_sum = 0.0
    for micro_rows in micro_batches(rows, micro, t.grad_accum, rt.dp_rank, rt.dp_size):
        batch = to_device(collate(micro_rows, recipe.data.max_seq_len, pad_id), rt.device)
        loss, ce_sum = model_loss(model, batch, n_trained / rt.dp_size)
        loss.backward()
        local_sum += ce_sum
    grad_norm = clip_grad_norm(model, t.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    (loss_total,) = all_sum([local_sum], rt)
    return loss_total / n_trained, grad_norm


def prepare_data(recipe: Recipe, tokenizer: Any, log: Callable[[str], None]):
    """Everything about the data that can fail, before any model is built."""
    encoder = Encoder(tokenizer, recipe.data)
    train = load_samples(recipe.data.train, "data.train", encoder, recipe.data.bad_rows, log)
    random.Random(recipe.seed).shuffle(train)
    train_rows = pack(train, recipe.data.max_seq_len, recipe.data.packing)
    val_rows, pairs = [], []
    if recipe.data.validation:
        val = load_samples(recipe.data.validation, "data.validation", encoder, recipe.data.bad_rows, log)
        val_rows = pack(val, recipe.data.max_seq_len, recipe.data.packing)
        if recipe.eval.generate:
            raw = read_rows(resolve_path(recipe.data.validation, "data.validation"), "data.validation")
            pairs = eval_pairs([row for _, row in raw], encoder, recipe.eval.num_samples)
    return train_rows, val_rows, pairs


def run(recipe: Recipe, resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as the recipe says; returns a summary (final losses, accuracies, paths)."""
    rt = init_runtime(recipe)
    say = log if rt.is_main else (lambda _msg: None)
    out_dir = Path(recipe.output.dir)
    ckpt_root = out_dir / "checkpoints"
    tokenizer = build_tokenizer(recipe.model)
    train_rows, val_rows, pairs = prepare_data(recipe, tokenizer, say)
    t = recipe.train
    if t.batch_size % (t.grad_accum * rt.dp_size):
        raise RecipeError(f"train.batch_size: {t.batch_size} rows do not split into grad_accum ({t.grad_accum}) x "
                          f"{rt.dp_size} data-parallel ranks; use a multiple of {t.grad_accum * rt.dp_size}")
    micro = t.batch_size // (t.grad_accum * rt.dp_size)
    plan = BatchPlan(train_rows, t.batch_size, recipe.seed, recipe.data.shuffle)
    total_steps = plan.total_steps(t.max_steps, t.epochs)
    resume_from = None
    if not resume and not recipe.output.overwrite and complete_checkpoints(ckpt_root):
        raise RecipeError(f"output.dir: {out_dir} holds checkpoints of an earlier run; pass --resume to continue it, "
                          "or choose another output.dir (output.overwrite: true replaces them)")
    if resume:
        clean_partial(ckpt_root, rt)
        found = complete_checkpoints(ckpt_root)
        if not found:
            raise RecipeError(f"--resume: no complete checkpoint in {ckpt_root}")
        resume_from = found[-1]

    model = build_model(recipe.model, tokenizer, rt, recipe.seed, t.router_aux_loss_coef, out_dir / "init")
    if recipe.lora.enabled:
        model = add_lora(model, recipe.lora, rt)
    model.train()
    optimizer = make_optimizer(recipe, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, total_steps))
    start = 0
    if resume_from is not None:
        extra = load_checkpoint(resume_from, model, optimizer, rt)
        scheduler.load_state_dict(extra["scheduler"])
        start = extra["step"]
        say(f"resumed from {resume_from} (step {start} of {total_steps})")
    elif rt.is_main and ckpt_root.exists():
        say(f"removing the checkpoints of an earlier run in {ckpt_root} (output.overwrite is true)")
        shutil.rmtree(ckpt_root)
    barrier(rt)

    sink = MetricsSink(out_dir, rt.is_main, recipe.output.tensorboard, start if resume_from else None)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {model.config.model_type}, {n_params / 1e6:.2f}M parameters, {model.config.num_hidden_layers} layers, "
        f"{type(model).__name__}; data: {len(train_rows)} packed rows of {recipe.data.max_seq_len} tokens, "
        f"{plan.steps_per_epoch} steps/epoch; {total_steps} steps on {rt.world_size} x {rt.device.type}")
    summary: dict[str, Any] = {"steps": total_steps, "output_dir": str(out_dir)}
    if pairs and resume_from is None:
        acc, _ = exact_match(model, tokenizer, pairs, recipe.eval.max_new_tokens, recipe.eval.batch_size, rt)
        summary["exact_match_before"] = acc
        say(f"exact match before training: {acc:.1%} on {len(pairs)} held-out prompts")
        sink.log({"step": 0, "exact_match": acc})

    fpt = flops_per_token(model, recipe.data.max_seq_len)
    compute_dtype = getattr(rt.setup, "param_dtype", None) or next(model.parameters()).dtype  # FSDP2 casts to it
    peak = peak_flops(rt.device, compute_dtype, t.peak_tflops)
    bar = progress_bar(total_steps, start, rt.is_main and t.progress)
    run_tokens, run_start, loss = 0, time.perf_counter(), float("nan")
    for step in range(start, total_steps):
        step_start = time.perf_counter()
        rows = plan.step_rows(step)
        lr = scheduler.get_last_lr()[0]
        loss, grad_norm = optimizer_step(model, optimizer, rows, micro, recipe, rt, tokenizer.pad_token_id)
        scheduler.step()
        now, tokens = time.perf_counter(), real_tokens(rows)  # loss.item() above waited for the device
        run_tokens += tokens
        done = step + 1
        tps = tokens / (now - step_start)  # this step, all ranks
        record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                  "step_s": now - step_start, "epoch": plan.epoch_of(done), "peak_mem_gib": peak_memory_gib(rt.device)}
        if peak:
            record["mfu"] = tps * fpt / (peak * rt.world_size)
        if done % t.log_every == 0 or done == total_steps:
            avg = run_tokens / (now - run_start)  # since this process started training
            bar.set_postfix_str(
                f"loss {loss:.4f} | {avg:,.0f} tok/s"
                + (f" | MFU {avg * fpt / (peak * rt.world_size):.1%}" if peak else "")
                + f" | mem {record['peak_mem_gib']:.2f} GiB",
                refresh=False,
            )
        if val_rows and ((t.eval_every and done % t.eval_every == 0) or done == total_steps):
            record["val_loss"] = validation_loss(model, val_rows, recipe, rt, tokenizer.pad_token_id, micro)
            if rt.is_main:
                bar.write(f"step {done}: train loss {loss:.4f}, validation loss {record['val_loss']:.4f}")
        sink.log(record)
        bar.update(1)
        if t.save_every and done % t.save_every == 0 and done < total_steps:
            extra = {"scheduler": scheduler.state_dict(), "epoch": plan.epoch_of(done)}
            save_checkpoint(ckpt_root, done, model, optimizer, extra, rt, recipe.output.keep_checkpoints)
    bar.close()
    summary["final_loss"] = loss
    if pairs:
        acc, examples = exact_match(model, tokenizer, pairs, recipe.eval.max_new_tokens, recipe.eval.batch_size, rt)
        summary["exact_match_after"] = acc
        sink.log({"step": total_steps, "exact_match": acc})
        for prompt, expected, got in examples[:3]:
            say(f"  {prompt!r} -> {got!r} (expected {expected!r})")
        before = summary.get("exact_match_before")
        say(f"exact match after training: {acc:.1%}" + (f" (before: {before:.1%})" if before is not None else ""))
    if recipe.output.export:
        merged = save_adapter_and_merge(model, out_dir / "adapter", rt) if recipe.lora.enabled else model
        final = export_hf(merged, tokenizer, out_dir / "final", rt)
        if final is not None:
            summary["export_dir"] = str(final)
            say(f"saved a standard Hugging Face checkpoint + tokenizer to {final}")
    if rt.is_main and recipe.output.plot:
        png = plot_losses(sink.records(), out_dir / "loss.png")
        if png is not None:
            summary["plot"] = str(png)
        say(f"loss curve: {png}" if png else "loss curve: no PNG without matplotlib (pip install matplotlib)")
    say(f"metrics: {sink.path}")
    sink.close()
    barrier(rt)
    shutdown(rt)
    return summary
