"""AdamW with torch.optim.AdamW's update, one Triton pass per parameter on the GPU.

The update is memory-bound (read param, grad, exp_avg, exp_avg_sq; write three of them): the kernel does it
in one pass computing in fp32, with the same formula and order as torch's fused AdamW. The reference path
(any device) is the same math in torch ops. The step count lives on the host, so no step synchronises.
State keys and layout match torch.optim.AdamW (step, exp_avg, exp_avg_sq), so state dicts move between them.

`in_backward=True` applies each parameter's update as soon as backward has produced its gradient (a
post-accumulate-grad hook), on a side CUDA stream so the memory-bound update overlaps the compute-bound
backward of earlier layers, and frees the gradient at once (no [params] of gradients is ever held). It is
the same update; what it gives up is gradient accumulation across backward calls and gradient clipping,
and `step()` must run before the next forward (it only waits for the side stream).
"""

from __future__ import annotations

import functools
import math

import torch

from .select import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, lr, beta1, beta2, eps, decay, step_size, bc2_sqrt,
                      BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        p = p * decay
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


def adamw_reference(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """In place, fp32 arithmetic, rounded once to each tensor's dtype (torch's fused AdamW's order)."""
    step_size = lr / (1 - beta1**step)
    bc2_sqrt = math.sqrt(1 - beta2**step)
    pf, gf = p.float() * (1 - lr * weight_decay), g.float()
    mf = m.float().mul_(beta1).add_(gf, alpha=1 - beta1)
    vf = v.float().mul_(beta2).addcmul_(gf, gf, value=1 - beta2)
    pf.sub_(step_size * mf / (vf.sqrt() / bc2_sqrt + eps))
    p.copy_(pf)
    m.copy_(mf)
    v.copy_(vf)


# The update as a custom op that mutates p, m and v in place: torch.compile traces automoe::adamw_step as one node
# whichever path runs, and the profiler shows it by name.
@torch.library.custom_op("automoe::adamw_step", mutates_args=("p", "m", "v"))
def _adamw_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float, step: float, kernels: str) -> None:
    # `kernels`, not `mode`: a mutating op's functionalization passes arguments by name, beside its own `mode`
    if use_triton(kernels, p) and all(t.is_contiguous() for t in (p, g, m, v)):
        _launch(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    else:
        adamw_reference(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)


@_adamw_step.register_fake
def _(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, kernels) -> None:
    return None


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW(lr, betas, eps, weight_decay) without amsgrad/maximize; `kernels` picks the path."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, kernels: str = "auto", in_backward: bool = False) -> None:
        if not isinstance(lr, float | int) or lr < 0:
            raise ValueError(f"automoe AdamW: lr must be a non-negative float (a tensor lr would sync), got {lr!r}")
        super().__init__(params, dict(lr=float(lr), betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.kernels = kernels
        self.in_backward = in_backward
        self._side_stream = None
        if in_backward:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        p.register_post_accumulate_grad_hook(functools.partial(self._update_now, group=group))
                        if p.is_cuda and self._side_stream is None:
                            self._side_stream = torch.cuda.Stream(p.device)

    @torch.no_grad()
    def _update_now(self, p: torch.Tensor, group: dict) -> None:
        if self._side_stream is None:
            self._update(p, group)
        else:
            self._side_stream.wait_stream(torch.cuda.current_stream(p.device))
            with torch.cuda.stream(self._side_stream):
                self._update(p, group)
            p.grad.record_stream(self._side_stream)
        p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._side_stream is not None:
            torch.cuda.current_stream(self._side_stream.device).wait_stream(self._side_stream)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("automoe AdamW does not take sparse gradients; use torch.optim.SparseAdam.")
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        args = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"], state["step"].item())  # CPU: no sync
        _adamw_step(*(_local(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])), *args, self.kernels)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2): the update is elementwise, so each rank updates its own."""
    return t.to_local() if hasattr(t, "to_local") else t


def _launch(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None:
    n = p.numel()
    block = 4096
    _adamw_kernel[(triton.cdiv(n, block),)](
        p, g, m, v, n, lr, beta1, beta2, eps, 1.0 - lr * weight_decay,
        lr / (1 - beta1**step), math.sqrt(1 - beta2**step), BLOCK=block, num_warps=8,
    )
