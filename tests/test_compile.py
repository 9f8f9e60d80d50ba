"""torch.compile on automoe models (issue 17, item 3): compiled forward + backward equal eager, in fp32 and bf16,
and the MoE block traces as one graph (no graph break inside it)."""

from __future__ import annotations

import pytest
import torch
from tiny_configs import make_config

from automoe import AutoMoEForCausalLM
from automoe.moe.block import MoEBlock
from automoe.numerics import relative_error as rel


def loss_and_grads(model, forward, ids):
    model.zero_grad(set_to_none=True)
    loss = forward(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype, router, tolerance", [
    (torch.float32, "model", 1e-5),
    # balanced routing: in bf16 a rounding difference can flip a near-tie top-k choice of the model's own router
    (torch.bfloat16, "balanced", 2e-2),
])
def test_compiled_model_matches_eager(dtype, router, tolerance):
    torch._dynamo.reset()
    config = make_config("qwen3_moe", num_hidden_layers=1)
    model = AutoMoEForCausalLM.from_config(config, dtype=dtype, automoe_options={"router": router})
    ids = torch.randint(3, config.vocab_size, (2, 16))
    eager_loss, eager_grads = loss_and_grads(model, model, ids)
    loss, grads = loss_and_grads(model, torch.compile(model), ids)
    assert rel(loss, eager_loss) <= tolerance, (loss, eager_loss)
    assert grads.keys() == eager_grads.keys()
    worst = max(grads, key=lambda n: rel(grads[n], eager_grads[n]))
    assert rel(grads[worst], eager_grads[worst]) <= tolerance, worst


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_moe_block_traces_as_one_graph(family):
    """fullgraph=True fails on any graph break: routing, the fused experts' forward and backward, shared experts."""
    torch._dynamo.reset()
    model = AutoMoEForCausalLM.from_config(make_config(family), dtype=torch.float32)
    block = next(m for m in model.modules() if isinstance(m, MoEBlock))
    x = torch.randn(2, 8, model.config.hidden_size, requires_grad=True)
    inputs = [x, *block.parameters()]

    def run(fn):
        out = fn(x)
        out = out[0] if isinstance(out, tuple) else out
        return out, torch.autograd.grad(out.square().sum(), inputs)

    eager, compiled = run(block), run(torch.compile(block, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_custom_ops_fake_kernels_match_their_eager_kernels():
    """torch.library.opcheck: schema, fake kernel (shapes, dtypes, strides), autograd registration, AOT dispatch."""
    from automoe.moe.grouped_mm import _grouped_mm_op

    rows, cols, experts = 12, 16, 3
    x = torch.randn(rows, cols, requires_grad=True)
    weight = (torch.rand(cols) + 0.5).requires_grad_(True)
    torch.library.opcheck(torch.ops.automoe.rms_norm_fwd.default, (x, weight, 1e-6, "torch"))
    _, rstd = torch.ops.automoe.rms_norm_fwd(x.detach(), weight.detach(), 1e-6, "torch")
    torch.library.opcheck(torch.ops.automoe.rms_norm_bwd.default,
                          (torch.randn(rows, cols), x.detach(), weight.detach(), rstd, "torch"))
    offsets = torch.tensor([4, 4, rows], dtype=torch.int32)
    w = torch.randn(experts, cols, 8, requires_grad=True)
    torch.library.opcheck(_grouped_mm_op, (x, w, offsets))
