"""The training loop of `automoe finetune`: data and recipe checks first, then train, evaluate, export.

Loss is the mean over every trained token of the global batch (all micro-batches, all ranks), so one
process and N processes, or grad_accum 1 and 4, follow the same curve.
"""

from __future__ import annotations

import math
import random
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
from .faults import pause_point
from .lora import add_lora, save_adapter_and_merge
from .metrics import MetricsSink, flops_per_token, peak_flops, peak_memory_gib, plot_losses, progress_bar
from .model import build_model, build_tokenizer, export_hf
from .outdir import prepare_output
from .runtime import (
    Runtime,
    agree,
    all_sum,
    barrier,
    clip_grad_norm,
    explain_collective_failure,
    gather,
    init_runtime,
    shutdown,
)
from .state import clean_partial, load_checkpoint, newest_verified_checkpoint, save_checkpoint
from .stop import Interrupted, StopSignals

# Keys that cannot change on --resume: they change the data, the model or the step plan the checkpoint belongs to.
# Every other key (optim.lr, the schedule, max_steps, eval, output, ...) applies from the resumed step on.
FIXED_ON_RESUME = ("seed", "model.path", "model.config", "model.tokenizer", "model.dtype", "model.init", "data.train",
                   "data.format", "data.prompt_field", "data.completion_field", "data.messages_field",
                   "data.chat_template", "data.max_seq_len", "data.packing", "data.shuffle", "train.batch_size",
                   "optim.name", "distributed", "lora")


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


def optimizer_hyperparameters(recipe: Recipe) -> dict[str, Any]:
    o = recipe.optim
    if o.name == "sgd":
        return dict(lr=o.lr, momentum=o.betas[0], weight_decay=o.weight_decay)
    return dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def make_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    cls = torch.optim.SGD if recipe.optim.name == "sgd" else torch.optim.AdamW
    return cls(params, **optimizer_hyperparameters(recipe))


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in ("model.config", "distributed", "model.automoe_options"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_on_resume(saved: dict[str, Any], recipe: Recipe, say: Callable[[str], None]) -> None:
    """Say which changed keys apply from the resumed step on; stop on a change the checkpoint cannot take."""
    before, now = _flat(saved), _flat(recipe.to_dict())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    fixed = [k for k in changed if k.startswith(FIXED_ON_RESUME)]
    if fixed:
        lines = "\n".join(f"  {k}: {before.get(k)!r} -> {now.get(k)!r}" for k in fixed)
        raise RecipeError(f"--resume: these keys changed since the checkpoint and cannot change mid-run (they change "
                          f"the data, the model or the step plan):\n{lines}\nrestore them, or start a new run in "
                          "another output.dir")
    if changed:
        say("--resume: applying the changed keys: " + "; ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}"
                                                              for k in changed))


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


def optimizer_step(model, optimizer, rows: list, micro: int, recipe: Recipe, rt: Runtime, pad_id: int,
                   stop_signal: int) -> tuple[float, float, bool]:
    """One optimizer step on the global batch `rows`: (mean loss per trained token, gradient norm, whether any rank
    was asked to stop). A step whose loss or gradient norm is not finite leaves the weights as they were.

    Each micro-batch's loss is its summed cross-entropy over the step's trained-token count (all ranks, all
    micro-batches); FSDP2 averages gradients over the data-parallel ranks, hence the dp_size factor. The loss
    and norm are global, so every rank makes the same decision; the stop flag rides on the same all-reduce."""
    t = recipe.train
    n_trained = max(trained_tokens(rows), 1)
    local_sum = 0.0
    for micro_rows in micro_batches(rows, micro, t.grad_accum, rt.dp_rank, rt.dp_size):
        batch = to_device(collate(micro_rows, recipe.data.max_seq_len, pad_id), rt.device)
        loss, ce_sum = model_loss(model, batch, n_trained / rt.dp_size)
        loss.backward()
        local_sum += ce_sum
    grad_norm = clip_grad_norm(model, t.grad_clip)
    loss_total, stops = all_sum([local_sum, float(stop_signal > 0)], rt)
    mean = loss_total / n_trained
    if math.isfinite(mean) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean, grad_norm, stops > 0


def model_is_finite(model: torch.nn.Module, rt: Runtime) -> bool:
    """Every parameter on every rank is free of NaN and inf."""
    bad = 0.0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        bad += float(not bool(torch.isfinite(local.detach()).all()))
    return all_sum([bad], rt)[0] == 0


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


def _preflight(recipe: Recipe, rt: Runtime, say):
    """Tokenizer, data, batch split and step plan: checked on every rank, agreed by all, before any model exists."""
    from .config import check_model_config

    result, problem = None, None
    try:
        if recipe.model.path is not None:
            check_model_config(recipe)
        tokenizer = build_tokenizer(recipe.model)
        train_rows, val_rows, pairs = prepare_data(recipe, tokenizer, say)
        t = recipe.train
        if t.batch_size % (t.grad_accum * rt.dp_size):
            raise RecipeError(f"train.batch_size: {t.batch_size} rows do not split into grad_accum ({t.grad_accum}) x "
                              f"{rt.dp_size} data-parallel ranks; use a multiple of {t.grad_accum * rt.dp_size}")
        plan = BatchPlan(train_rows, t.batch_size, recipe.seed, recipe.data.shuffle)
        result = (tokenizer, train_rows, val_rows, pairs, plan, plan.total_steps(t.max_steps, t.epochs))
    except RecipeError as e:
        problem = str(e)
    agree(rt, problem)
    plans = gather(rt, (len(result[1]), result[5]))
    if len(set(plans)) > 1:
        ranks = ", ".join(f"rank {r}: {rows} packed rows, {steps} steps" for r, (rows, steps) in enumerate(plans))
        raise RecipeError(f"the ranks disagree on the step plan ({ranks}); every rank must read the same data "
                          f"(data.train {recipe.data.train} differs between them)")
    return result


def run(recipe: Recipe, resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as the recipe says; returns a summary (final losses, accuracies, paths)."""
    rt = init_runtime(recipe)
    say = log if rt.is_main else (lambda _msg: None)
    lock = None
    try:
        lock = prepare_output(recipe, resume, rt, say)
        return _train(recipe, resume, rt, say)
    finally:
        if lock is not None:
            lock.release()
        shutdown(rt)


def _train(recipe: Recipe, resume: bool, rt: Runtime, say: Callable[[str], None]) -> dict[str, Any]:
    out_dir = Path(recipe.output.dir)
    ckpt_root = out_dir / "checkpoints"
    t = recipe.train
    tokenizer, train_rows, val_rows, pairs, plan, total_steps = _preflight(recipe, rt, say)
    micro = t.batch_size // (t.grad_accum * rt.dp_size)
    resume_from = None
    if resume:
        clean_partial(ckpt_root, rt)
        resume_from, manifest = newest_verified_checkpoint(ckpt_root, rt, say)
        changed_on_resume(manifest["recipe"], recipe, say)

    model = build_model(recipe.model, tokenizer, rt, recipe.seed, t.router_aux_loss_coef, out_dir / "init")
    if recipe.lora.enabled:
        model = add_lora(model, recipe.lora, rt)
    model.train()
    optimizer = make_optimizer(recipe, model)
    schedule = lr_lambda(recipe, total_steps)
    start = 0
    if resume_from is not None:
        extra = load_checkpoint(resume_from, model, optimizer, rt)
        for group in optimizer.param_groups:  # the recipe's hyperparameters, not the saved ones
            group.update(optimizer_hyperparameters(recipe))
        start = extra["step"]
        say(f"resumed from {resume_from} (step {start} of {total_steps})")
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

    def save(done: int) -> Path:
        if not model_is_finite(model, rt):
            raise RecipeError(f"step {done}: the model holds NaN or inf values; it is not checkpointed (the earlier "
                              f"checkpoints in {ckpt_root} are kept). Lower optim.lr or set train.grad_clip, then "
                              "--resume")
        return save_checkpoint(ckpt_root, done, model, optimizer, {"epoch": plan.epoch_of(done)}, recipe.to_dict(),
                               rt, recipe.output.keep_checkpoints)

    fpt = flops_per_token(model, recipe.data.max_seq_len)
    compute_dtype = getattr(rt.setup, "param_dtype", None) or next(model.parameters()).dtype  # FSDP2 casts to it
    peak = peak_flops(rt.device, compute_dtype, t.peak_tflops)
    bar = progress_bar(total_steps, start, rt.is_main and t.progress)
    run_tokens, run_start, loss, nonfinite = 0, time.perf_counter(), float("nan"), 0
    with StopSignals() as signals:
        for step in range(start, total_steps):
            done = step + 1
            pause_point(f"step_{done}_rank{rt.rank}")
            step_start = time.perf_counter()
            rows = plan.step_rows(step)
            lr = recipe.optim.lr * schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                loss, grad_norm, stopping = optimizer_step(model, optimizer, rows, micro, recipe, rt,
                                                           tokenizer.pad_token_id, signals.signum)
            except RuntimeError as e:
                raise explain_collective_failure(rt, e, f"step {done}") from e
            now, tokens = time.perf_counter(), real_tokens(rows)  # loss.item() above waited for the device
            run_tokens += tokens
            tps = tokens / (now - step_start)  # this step, all ranks
            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                      "step_s": now - step_start, "epoch": plan.epoch_of(done),
                      "peak_mem_gib": peak_memory_gib(rt.device)}
            if peak:
                record["mfu_datasheet"] = tps * fpt / (peak * rt.world_size)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                nonfinite += 1
                record["skipped"] = "non-finite loss or gradient norm"
                sink.log(record)
                say(f"step {done}: loss {loss}, gradient norm {grad_norm}: step skipped, the weights are unchanged "
                    f"({nonfinite} so far, limit train.max_nonfinite_steps={t.max_nonfinite_steps})")
                if nonfinite > t.max_nonfinite_steps:
                    raise RecipeError(f"step {done}: {nonfinite} steps had a NaN or infinite loss or gradient norm "
                                      f"(more than train.max_nonfinite_steps={t.max_nonfinite_steps}); the run stops "
                                      f"without exporting. Lower optim.lr (now {recipe.optim.lr:g}) or set "
                                      f"train.grad_clip, then --resume from the last checkpoint in {ckpt_root}")
            else:
                if done % t.log_every == 0 or done == total_steps:
                    avg = run_tokens / (now - run_start)  # since this process started training
                    bar.set_postfix_str(
                        f"loss {loss:.4f} | {avg:,.0f} tok/s"
                        + (f" | MFU {avg * fpt / (peak * rt.world_size):.1%} of datasheet peak" if peak else "")
                        + f" | mem {record['peak_mem_gib']:.2f} GiB",
                        refresh=False,
                    )
                if val_rows and ((t.eval_every and done % t.eval_every == 0) or done == total_steps):
                    record["val_loss"] = validation_loss(model, val_rows, recipe, rt, tokenizer.pad_token_id, micro)
                    if rt.is_main:
                        bar.write(f"step {done}: train loss {loss:.4f}, validation loss {record['val_loss']:.4f}")
                sink.log(record)
            bar.update(1)
            if stopping:
                bar.close()
                signum = signals.signum or 15  # a rank that was not signalled itself stops as SIGTERM would
                raise Interrupted(signum, done, str(save(done)))
            if t.save_every and (done % t.save_every == 0 or done == total_steps):
                save(done)
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
        if not model_is_finite(model, rt):
            raise RecipeError("the trained model holds NaN or inf values; it is not exported")
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
    return summary
