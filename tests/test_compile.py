"""torch.compile on automoe models (issue 17, item 3): compiled forward + backward equal eager, in fp32 and bf16,
and the MoE block traces as one graph (no graph break inside it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_configs import make_config

import automoe
from automoe import AutoMoEForCausalLM
from automoe.kernels import moe
from automoe.kernels.select import interpreting, triton_available
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


def automoe_ops_traced(fn, *args) -> tuple[list[str], set[str]]:
    """(the graph breaks whose stack passes through automoe's code, the automoe custom ops in dynamo's graphs)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    source = str(Path(automoe.__file__).parent)
    breaks = [reason.reason for reason in explained.break_reasons
              if any(frame.filename.startswith(source) for frame in reason.user_stack)]
    modules = [module for graph in explained.graphs for module in graph.modules()  # with autograd Functions' bodies
               if isinstance(module, torch.fx.GraphModule)]
    ops = {str(node.target) for module in modules for node in module.graph.nodes
           if node.op == "call_function" and str(node.target).startswith("automoe.")}
    return breaks, ops


def test_each_fused_kernel_is_one_op_node_of_the_compiled_model():
    """Compile sees automoe's fused functions as single custom-op nodes (what activation checkpointing policies and
    the profiler name), not as the autograd Functions' traced insides, and no graph break comes from automoe's code
    (plain HF's output capture has its own)."""
    config = make_config("qwen3_moe", num_hidden_layers=1)
    model = AutoMoEForCausalLM.from_config(config, dtype=torch.float32, automoe_options={"fused_loss": True})
    ids = torch.randint(3, config.vocab_size, (2, 16))
    breaks, ops = automoe_ops_traced(lambda i: model(input_ids=i, labels=i).loss, ids)
    assert breaks == []
    assert {"automoe.routed_experts_fwd.default", "automoe.rope_fwd.default", "automoe.rms_norm_fwd.default",
            "automoe.linear_cross_entropy.default"} <= ops, ops


@pytest.mark.skipif(not triton_available() or not (torch.cuda.is_available() or interpreting()),
                    reason="the Triton path needs triton and a GPU (or TRITON_INTERPRET=1 on CPU)")
def test_moe_block_on_the_triton_path_traces_as_one_graph():
    """Dynamo does not trace into the Triton launches (they are inside the custom ops): fullgraph holds."""
    torch._dynamo.reset()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoMoEForCausalLM.from_config(make_config("qwen3_moe", num_hidden_layers=1), dtype=torch.float32,
                                               automoe_options={"kernels": "triton"})
    block = next(m for m in model.modules() if isinstance(m, MoEBlock))
    x = torch.randn(2, 8, model.config.hidden_size, device=device, requires_grad=True)
    inputs = [x, *block.parameters()]

    def run(fn):
        out = fn(x)
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


def test_every_torch_path_op_passes_opcheck():
    """The ops added beside rms_norm and grouped_mm: routed experts (with biases and LoRA factors), RoPE, the combine,
    the fused loss and AdamW's in-place update."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from automoe.moe.dispatch import expert_rows
    from automoe.moe.spec import ExpertsSpec

    torch.manual_seed(0)
    tokens, experts, hidden, inter, rank = 10, 4, 8, 8, 4  # grouped_mm: 16-byte rows
    ids = torch.randn(tokens, experts).topk(2, dim=-1).indices
    rows = expert_rows(ids, torch.rand(tokens, 2), experts, ids.numel())
    rows_args = (rows.token_of_row, rows.offsets, rows.weights.requires_grad_(True), rows.token_rows, rows.token_ptr)
    param = lambda *shape: (torch.randn(*shape) * 0.3).requires_grad_(True)  # noqa: E731
    for spec, biases, lora in [
        (ExpertsSpec(experts, hidden, inter, act_name="silu"), (None, None), (None,) * 4),
        (ExpertsSpec(experts, hidden, inter, activation="clamped_swiglu", interleaved=True, transposed=True,
                     has_bias=True, swiglu_limit=1.0),
         (param(experts, 2 * inter), param(experts, hidden)),
         (param(experts, hidden, rank), param(experts, rank, 2 * inter), param(experts, inter, rank),
          param(experts, rank, hidden))),
    ]:
        gate_up = param(experts, hidden, 2 * inter) if spec.transposed else param(experts, 2 * inter, hidden)
        down = param(experts, inter, hidden) if spec.transposed else param(experts, hidden, inter)
        # the ops' autograd is a Function around them (kernels/moe.py), so each op is checked without grad
        tensors = [t if t is None else t.detach() for t in (param(tokens, hidden), *rows_args, gate_up, down, *biases,
                                                            *lora)]
        spec_args = moe._spec_args(spec)
        torch.library.opcheck(torch.ops.automoe.routed_experts_fwd.default, (*tensors, *spec_args, "torch"))
        out, h, low1, low2 = torch.ops.automoe.routed_experts_fwd(*tensors, *spec_args, "torch")
        # opcheck's modes cannot read the torch.func.vjp wrappers of the torch activation backward: the fake kernel
        # is held to the real one by hand
        bwd_args = (torch.randn_like(out), *tensors, low1, low2, h, *spec_args, "torch", [True] * 10)
        real = torch.ops.automoe.routed_experts_bwd(*bwd_args)
        with FakeTensorMode() as fake_mode:
            fake = torch.ops.automoe.routed_experts_bwd(
                *(fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in bwd_args))
        assert [(t.shape, t.dtype, t.stride()) for t in fake] == [(t.shape, t.dtype, t.stride()) for t in real]
    q, k = torch.randn(2, 3, 5, 8, requires_grad=True), torch.randn(2, 1, 5, 8, requires_grad=True)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    torch.library.opcheck(torch.ops.automoe.rope_fwd.default, (q, k, cos, sin, "torch"))
    torch.library.opcheck(torch.ops.automoe.gather_sum.default,
                          (torch.randn(ids.numel(), hidden, requires_grad=True), rows.token_of_row, rows.token_rows,
                           rows.token_ptr, "torch"))
    labels = torch.tensor([1, 2, -100, 4, 0, 3])
    torch.library.opcheck(torch.ops.automoe.linear_cross_entropy.default,
                          (param(6, hidden), param(7, hidden), labels, torch.tensor(0.2), "torch"))
    p, g, m, v = torch.randn(5), torch.randn(5), torch.randn(5), torch.rand(5)
    torch.library.opcheck(torch.ops.automoe.adamw_step.default, (p, g, m, v, 1e-3, 0.9, 0.99, 1e-8, 0.01, 3.0, "torch"))
