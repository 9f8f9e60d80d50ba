"""Linear + cross-entropy in chunks of tokens: the [tokens, vocab] logits never exist whole.

For each chunk the logits are made (one GEMM), turned in place into d(loss)/d(logits) (softmax - one-hot,
scaled) while the loss is read off, and used at once for d(hidden) and d(weight); backward only scales those
by the incoming gradient. At seq 4096 and a 152k vocabulary that avoids ~4 GiB of bf16 logits, their fp32
upcast and its gradient; at 64k tokens, ~60 GiB.
"""

from __future__ import annotations

import torch

from .select import triton_available, use_triton

IGNORE_INDEX = -100
CHUNK_BYTES = 1 << 30  # logits of one chunk, in the hidden dtype

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _ce_grad_kernel(logits_ptr, labels_ptr, loss_ptr, scale_ptr, vocab, ignore_index, BLOCK: tl.constexpr):
        """Row-wise: loss = lse - logit[label]; logits <- (softmax - onehot) * scale, in place."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * vocab
        label = tl.load(labels_ptr + row)
        scale = tl.load(scale_ptr).to(tl.float32)
        m = -float("inf")
        s = 0.0
        for start in range(0, vocab, BLOCK):
            col = start + tl.arange(0, BLOCK)
            x = tl.load(base + col, mask=col < vocab, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        valid = label != ignore_index
        target = tl.load(base + label, mask=valid, other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
        factor = tl.where(valid, scale, 0.0)
        for start in range(0, vocab, BLOCK):
            col = start + tl.arange(0, BLOCK)
            mask = col < vocab
            x = tl.load(base + col, mask=mask, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(col == label, 1.0, 0.0)) * factor
            tl.store(base + col, g.to(logits_ptr.dtype.element_ty), mask=mask)


def ce_grad_reference(
    logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss fp32, d loss/d logits in the logits dtype) for one chunk; ignored rows get 0 and 0."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    valid = labels != IGNORE_INDEX
    safe = labels.clamp_min(0)
    loss = torch.where(valid, lse - lf.gather(1, safe[:, None]).squeeze(1), 0.0)
    grad = torch.softmax(lf, dim=-1)
    grad.scatter_add_(1, safe[:, None], -torch.ones_like(grad[:, :1]))
    grad = grad * (valid.float() * scale)[:, None]
    return loss, grad.to(logits.dtype)


def _ce_grad(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, mode: str):
    if not use_triton(mode, logits):
        return ce_grad_reference(logits, labels, scale)
    rows, vocab = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows:
        _ce_grad_kernel[(rows,)](logits, labels, loss, scale, vocab, IGNORE_INDEX, BLOCK=4096, num_warps=8)
    return loss, logits


# One custom op (fake kernel: shapes and dtypes): torch.compile traces automoe::linear_cross_entropy as one node, not
# its chunk loop and Triton launches, and the profiler and activation checkpointing see it. It returns the
# gradients it makes beside the loss; its registered backward only scales them.
@torch.library.custom_op("automoe::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                          mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum over rows of CE(hidden @ weight.T, labels) * scale, its gradients for hidden and weight)."""
    rows = hidden.shape[0]
    chunks = max(1, -(-rows * weight.shape[0] * hidden.element_size() // CHUNK_BYTES))
    chunk = max(1, -(-rows // chunks))
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight)
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for start in range(0, rows, chunk):
        h = hidden[start : start + chunk]
        logits = h @ weight.t()
        loss, grad = _ce_grad(logits, labels[start : start + chunk], scale, mode)
        del logits
        total += loss.sum()
        torch.mm(grad, weight, out=grad_hidden[start : start + chunk])
        # accumulated in the weight's dtype, as Liger-Kernel does: one rounding per chunk
        grad_weight.addmm_(grad.t(), h)
        del grad
    return total * scale, grad_hidden, grad_weight


@_linear_cross_entropy.register_fake
def _(hidden, weight, labels, scale, mode):
    loss = hidden.new_empty((), dtype=torch.promote_types(torch.float32, scale.dtype))
    return loss, torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad_loss, _grad_hidden, _grad_weight):
    grad_hidden, grad_weight = ctx.saved_tensors
    grad_loss = grad_loss.to(grad_hidden.dtype)
    return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mode: str,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF's ForCausalLMLoss (shift by one, ignore -100, mean or sum / num_items_in_batch) without the logits."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    flat = shift_labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        denominator = (flat != IGNORE_INDEX).sum().clamp_min(1)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device)
    scale = (1.0 / denominator.float()).reshape(())
    h = hidden.reshape(-1, hidden.shape[-1])
    loss, _, _ = _linear_cross_entropy(h, weight, flat.contiguous(), scale, mode)
    return loss
