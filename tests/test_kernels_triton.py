"""The Triton kernels against their torch references: on a GPU in bf16, or on CPU through Triton's
interpreter (TRITON_INTERPRET=1) in fp32. Skipped where neither can run (CI has no GPU and no triton).

Tolerances, as relative L2 error: fp32 (interpreter) 1e-5; bf16 elementwise kernels 1e-2 (a few bf16
roundings); bf16 GEMM chains (routed experts, against an fp32 reference) 2e-2.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from automoe.kernels import AdamW, combine, cross_entropy, moe, rmsnorm, rope, swiglu
from automoe.kernels.router import fused_route
from automoe.kernels.select import interpreting, triton_available
from automoe.moe.dispatch import LocalDispatcher, expert_rows
from automoe.moe.experts import Experts
from automoe.moe.router import route
from automoe.moe.spec import ExpertsSpec, RouterSpec
from automoe.numerics import relative_error as rel

GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not triton_available() or not (GPU or interpreting()),
    reason="needs triton and a GPU (or TRITON_INTERPRET=1 on CPU)",
)
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
TOL = 1e-2 if GPU else 1e-5



def randn(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE)


SPEC = ExpertsSpec(num_experts=8, hidden_size=64, intermediate_size=96, act_name="silu")


def test_swiglu_forward_backward():
    h, w = randn(37, 2 * SPEC.intermediate_size), torch.rand(37, device=DEVICE)
    grad = randn(37, SPEC.intermediate_size)
    out = swiglu.weighted_activation(h, w, SPEC, nn.SiLU(), "triton")
    assert rel(out, swiglu.weighted_activation_reference(h.float(), w, SPEC, nn.SiLU())) < TOL
    got = swiglu.weighted_activation_backward(grad, h, w, SPEC, "triton")
    want = swiglu.weighted_activation_backward(grad.float(), h.float(), w, SPEC, "torch")
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < TOL


def test_routed_experts_triton_match_fp32_reference():
    experts = Experts(SPEC, nn.SiLU(), "grouped_mm")
    e, hid, inter = SPEC.num_experts, SPEC.hidden_size, SPEC.intermediate_size
    experts.gate_up_proj = nn.Parameter(randn(e, 2 * inter, hid, scale=0.2))
    experts.down_proj = nn.Parameter(randn(e, hid, inter, scale=0.2))
    x = randn(300, hid).requires_grad_(True)
    ids = torch.randn(300, e, device=DEVICE).topk(2, dim=-1).indices
    weights = torch.rand(300, 2, device=DEVICE, requires_grad=True)
    out = moe.routed_experts(experts, x, expert_rows(ids, weights, e, ids.numel()), "triton")
    grad = torch.randn_like(out)
    params = (x, weights, experts.gate_up_proj, experts.down_proj)
    got = (out, *torch.autograd.grad(out, params, grad))
    ref_experts = Experts(SPEC, nn.SiLU(), "grouped_mm")
    ref_experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach().float())
    ref_experts.down_proj = nn.Parameter(experts.down_proj.detach().float())
    xf = x.detach().float().requires_grad_(True)
    ref = moe.routed_experts(ref_experts, xf, expert_rows(ids, weights, e, ids.numel()), "torch")
    want = (ref, *torch.autograd.grad(ref, (xf, weights, ref_experts.gate_up_proj, ref_experts.down_proj),
                                      grad.float()))
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < 2 * TOL


@pytest.mark.parametrize("cols", [128, 2048, 100])
def test_rms_norm(cols):
    x = randn(3, 41, cols).requires_grad_(True)
    weight = torch.rand(cols, device=DEVICE).to(DTYPE).requires_grad_(True)
    out = rmsnorm.rms_norm(x, weight, 1e-6, "triton")
    grad = randn(*out.shape)
    got = (out, *torch.autograd.grad(out, (x, weight), grad))
    xf, wf = x.detach().float().requires_grad_(True), weight.detach().float().requires_grad_(True)
    ref = rmsnorm.rms_norm_reference(xf, wf, 1e-6)
    want = (ref, *torch.autograd.grad(ref, (xf, wf), grad.float()))
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < TOL


def distinct_logits(rows: int, experts: int) -> torch.Tensor:
    """Logits with no two equal in a row: bf16 randn rows tie often, and torch.topk orders ties as it likes."""
    positive = torch.arange(0x3C00, 0x4080, dtype=torch.int16).view(torch.bfloat16).float()  # 2**-7 .. 4
    pool = torch.cat([positive, -positive])
    return pool[torch.rand(rows, pool.numel()).argsort(dim=1)[:, :experts]].to(DEVICE, DTYPE)


ROUTERS = {
    "softmax": RouterSpec(num_experts=8, top_k=2),
    "softmax_top1": RouterSpec(num_experts=16, top_k=1),
    "softmax_norm": RouterSpec(num_experts=128, top_k=8, norm_topk_prob=True),
    "softmax_norm_scaled_e60": RouterSpec(num_experts=60, top_k=4, norm_topk_prob=True, routed_scaling_factor=2.5,
                                          renorm_eps=1e-20),
    "softmax_fp32_weights": RouterSpec(num_experts=64, top_k=6, weights_in_fp32=True),
    "softmax_e512": RouterSpec(num_experts=512, top_k=10, norm_topk_prob=True, weights_in_fp32=True),
    "softmax_all_experts": RouterSpec(num_experts=6, top_k=6, norm_topk_prob=True),
    "topk_softmax": RouterSpec(num_experts=32, top_k=4, score_func="topk_softmax"),
    "topk_softmax_e100": RouterSpec(num_experts=100, top_k=7, score_func="topk_softmax", weights_in_fp32=True),
}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_topk_matches_route(name):
    spec = ROUTERS[name]
    logits = distinct_logits(45, spec.num_experts).requires_grad_(True)
    weights, ids = fused_route(logits, spec, "triton")
    ref_weights, ref_ids = route(logits.detach(), spec, None)
    assert ids.dtype == torch.int64 and torch.equal(ids, ref_ids)
    assert weights.dtype == ref_weights.dtype
    grad = torch.randn(weights.shape, device=DEVICE).to(weights.dtype)
    (got,) = torch.autograd.grad(weights, logits, grad)
    xf = logits.detach().float().requires_grad_(True)  # bf16 logits are exact in fp32: the same ids
    ref_weights, _ = route(xf, spec, None)
    (want,) = torch.autograd.grad(ref_weights, xf, grad.float())
    assert got.dtype == logits.dtype
    assert rel(weights, ref_weights) < TOL and rel(got, want) < TOL


def test_router_topk_ties_take_the_lower_expert_first():
    logits = torch.zeros(3, 16, device=DEVICE, dtype=DTYPE)
    logits[1, 5:9] = 1.0
    logits[2, :2] = float("-inf")
    _, ids = fused_route(logits, RouterSpec(num_experts=16, top_k=3), "triton")
    assert ids.tolist() == [[0, 1, 2], [5, 6, 7], [2, 3, 4]]


def rope_inputs(layout: str, trig: str, head_dim: int):
    """q/k as HF builds them (proj(x).view(B, S, H, D).transpose(1, 2)) or contiguous; Hq != Hk; cos/sin as the
    rotary embedding gives them (one batch row, duplicated halves) or random per batch row."""
    b, s, hq, hk = 2, 37, 6, 2
    if layout == "hf":
        q, k = randn(b, s, hq, head_dim).transpose(1, 2), randn(b, s, hk, head_dim).transpose(1, 2)
    else:
        q, k = randn(b, hq, s, head_dim), randn(b, hk, s, head_dim)
    if trig == "rotary":
        inv_freq = 1e4 ** -(torch.arange(0, head_dim, 2, device=DEVICE) / head_dim)
        angles = torch.arange(s, device=DEVICE)[:, None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)[None]
        cos, sin = angles.cos().to(DTYPE), angles.sin().to(DTYPE)
    else:
        cos, sin = randn(b, s, head_dim), randn(b, s, head_dim)
    return q.requires_grad_(True), k.requires_grad_(True), cos, sin


@pytest.mark.parametrize("layout", ["hf", "contiguous"])
@pytest.mark.parametrize("trig", ["rotary", "random"])
@pytest.mark.parametrize("head_dim", [128, 12])
def test_rope_forward_backward(layout, trig, head_dim):
    q, k, cos, sin = rope_inputs(layout, trig, head_dim)
    out = rope.rope(q, k, cos, sin, "triton")
    for o in out:  # [B, S, H, D] memory seen as [B, H, S, D]: what SDPA takes
        assert o.dtype == DTYPE and o.stride(-1) == 1 and o.transpose(1, 2).is_contiguous()
    grads = [randn(*o.shape) for o in out]
    got = (*out, *torch.autograd.grad(out, (q, k), grads))
    qf, kf = (t.detach().float().requires_grad_(True) for t in (q, k))
    ref = rope.rope_reference(qf, kf, cos.float(), sin.float())
    want = (*ref, *torch.autograd.grad(ref, (qf, kf), [g.float() for g in grads]))
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and rel(a, b) < TOL


def test_rope_in_a_checkpointed_model_takes_the_kernel_and_a_plain_model_does_not(monkeypatch):
    import sys

    sys.path.insert(0, "tests")
    from tiny_configs import make_config
    from transformers import AutoModelForCausalLM

    from automoe import AutoMoEForCausalLM

    calls = []
    triton_rope = rope._rope_triton
    monkeypatch.setattr(rope, "_rope_triton", lambda *a, **kw: calls.append(kw["backward"]) or triton_rope(*a, **kw))
    ours = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), dtype=DTYPE).to(DEVICE)
    ref = AutoModelForCausalLM.from_config(make_config("qwen3_moe"), dtype=DTYPE).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours.train()
    ids = torch.randint(0, 128, (2, 64), device=DEVICE)
    loss = ours(input_ids=ids, labels=ids).loss
    assert calls == [False, False]
    loss.backward()
    assert calls.count(False) == 4 and calls.count(True) == 2, "recomputed forwards take the kernel too"
    with torch.no_grad():
        ref_loss = ref(input_ids=ids, labels=ids).loss
    assert len(calls) == 6, "a plain HF model keeps its own path"
    assert rel(loss, ref_loss) < TOL


def test_cross_entropy_grad_kernel():
    logits, labels = randn(19, 5000, scale=3.0), torch.randint(0, 5000, (19,), device=DEVICE)
    labels[4] = cross_entropy.IGNORE_INDEX
    scale = torch.tensor(0.25, device=DEVICE)
    want_loss, want_grad = cross_entropy.ce_grad_reference(logits.float(), labels, scale)
    loss, grad = cross_entropy._ce_grad(logits.clone(), labels, scale, "triton")
    assert rel(loss, want_loss) < TOL and rel(grad, want_grad) < TOL
    assert loss[4] == 0 and grad[4].abs().max() == 0


def test_adamw_same_update_as_torch():
    params = [randn(1000, 33), randn(7)]
    ours = [nn.Parameter(p.clone()) for p in params]
    ref = [nn.Parameter(p.clone()) for p in params]
    kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = AdamW(ours, kernels="triton", **kw)
    ref_opt = torch.optim.AdamW(ref, fused=GPU, foreach=False if not GPU else None, **kw)
    for _ in range(3):
        for a, b in zip(ours, ref, strict=True):
            g = randn(*a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref, strict=True):
        # bf16: the same fp32 arithmetic rounded once; allow one bf16 ulp on a few elements
        assert rel(a, b) < (1e-3 if GPU else 1e-6)


@pytest.mark.skipif(not GPU, reason="cuDNN attention and host syncs exist only on the GPU")
def test_attention_uses_cudnn_and_matches_math():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from automoe.kernels.attention import automoe_sdpa_forward

    module = nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 8, True, True
    q = torch.randn(1, 32, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 4, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 4, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out, _ = automoe_sdpa_forward(module, q, k, v, None, scaling=128**-0.5)
        out.backward(torch.ones_like(out))
    names = " ".join(e.name for e in prof.events()).lower()
    assert "cudnn" in names, "the cuDNN backend was not picked"
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=True,
                                                                scale=128**-0.5)
    ref.backward(torch.ones_like(ref))
    assert rel(out.transpose(1, 2), ref) < TOL
    assert rel(q.grad, qf.grad) < 2 * TOL and rel(k.grad, kf.grad) < 2 * TOL


@pytest.mark.skipif(not GPU, reason="the side stream exists only on the GPU")
def test_adamw_in_backward_on_a_side_stream_matches_torch_fused():
    import sys

    sys.path.insert(0, "tests")
    from tiny_configs import make_config

    from automoe import AutoMoEForCausalLM

    torch.manual_seed(0)
    ours = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), dtype=torch.bfloat16).cuda()
    ref = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), dtype=torch.bfloat16).cuda()
    ref.load_state_dict(ours.state_dict())
    kw = dict(lr=1e-3, weight_decay=0.01)
    opt = AdamW(ours.parameters(), kernels="triton", in_backward=True, **kw)
    ref_opt = torch.optim.AdamW(ref.parameters(), fused=True, **kw)
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 64), device="cuda")
        ours(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        ref(input_ids=ids, labels=ids).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        assert rel(param, ref_params[name]) < 1e-2, name


@pytest.mark.skipif(not GPU, reason="host syncs exist only on the GPU")
def test_moe_layer_step_has_no_host_sync():
    import sys

    sys.path.insert(0, "tests")
    from tiny_configs import make_config

    from automoe import AutoMoEForCausalLM

    model = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), dtype=torch.bfloat16).cuda()
    block = model.model.layers[0].mlp
    x = torch.randn(1, 64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    block(x).sum().backward()  # warm-up (first calls may sync while loading kernels)
    torch.cuda.set_sync_debug_mode("error")
    try:
        block(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


GPT_OSS = ExpertsSpec(num_experts=8, hidden_size=64, intermediate_size=96, activation="clamped_swiglu",
                      interleaved=True, transposed=True, has_bias=True)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("interleaved", [True, False])
def test_clamped_swiglu_forward_backward(with_bias, interleaved):
    spec = ExpertsSpec(num_experts=8, hidden_size=64, intermediate_size=96, activation="clamped_swiglu",
                       interleaved=interleaved, has_bias=with_bias)
    rows, inter, limit = 37, spec.intermediate_size, spec.swiglu_limit
    h, w = randn(rows, 2 * inter, scale=6.0), torch.rand(rows, device=DEVICE)  # many gates/ups beyond the limit 7
    table, row_expert = randn(spec.num_experts, 2 * inter, scale=3.0), torch.randint(0, 8, (rows,), device=DEVICE)
    bias = (table, row_expert) if with_bias else None
    grad = randn(rows, inter)
    args = (spec, nn.SiLU())
    out = swiglu.weighted_activation(h, w, *args, "triton", bias)
    assert rel(out, swiglu.weighted_activation_reference(h.float(), w, *args, bias)) < TOL
    got = swiglu.weighted_activation_backward(grad, h, w, spec, "triton", bias)
    want = swiglu.weighted_activation_backward(grad.float(), h.float(), w, spec, "torch", bias)
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < TOL
    biased = h.float() + (table.float()[row_expert] if with_bias else 0)
    gate, up = (biased[:, ::2], biased[:, 1::2]) if interleaved else biased.chunk(2, dim=-1)
    beyond = (gate > limit, up.abs() > limit)
    clamped = torch.stack(beyond, dim=-1).flatten(1) if interleaved else torch.cat(beyond, dim=-1)
    assert clamped.float().mean() > 0.1
    assert got[0][clamped].abs().max() == 0 and want[0][clamped].abs().max() == 0, "a clamped input gets no gradient"


def test_routed_experts_gpt_oss_match_reference():
    torch.manual_seed(0)
    e, hid, inter = GPT_OSS.num_experts, GPT_OSS.hidden_size, GPT_OSS.intermediate_size
    tensors = {"gate_up_proj": randn(e, hid, 2 * inter, scale=0.5), "down_proj": randn(e, inter, hid, scale=0.2),
               "gate_up_proj_bias": randn(e, 2 * inter, scale=2.0), "down_proj_bias": randn(e, hid, scale=0.5)}
    x = randn(300, hid, scale=2.0).requires_grad_(True)
    ids = torch.randn(300, e, device=DEVICE).topk(4, dim=-1).indices
    weights = torch.rand(300, 4, device=DEVICE).to(DTYPE).requires_grad_(True)

    grad = randn(300, hid)

    def run(path: str):
        """Ours ("triton", or the Function's own torch path) in DTYPE, or the core's dispatch -> experts -> combine
        in fp32 ("composed"), autograd all the way."""
        dtype = DTYPE if path != "composed" else torch.float32
        experts = Experts(GPT_OSS, nn.SiLU(), "grouped_mm")
        for name, value in tensors.items():
            setattr(experts, name, nn.Parameter(value.to(dtype)))
        xs = x.detach().to(dtype).requires_grad_(True)
        ws = weights.detach().to(dtype).requires_grad_(True)
        if path != "composed":
            experts.fused_forward = moe.fused_experts_fn(path)
        out = LocalDispatcher(e)(xs, ids, ws, experts)[0]
        return (out, *torch.autograd.grad(out, (xs, ws, *experts.parameters()), grad.to(out.dtype)))

    # In bf16 an fp32 reference decides some clamps differently (h within a rounding of the limit), which moves
    # the gradients by a few percent whatever the kernel does; there the Function's torch path, which computes h
    # with the same GEMM, is the reference.
    got, want = run("triton"), run("torch" if DTYPE == torch.bfloat16 else "composed")
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and rel(a, b) < 2 * TOL


@pytest.mark.parametrize("top_k, hidden", [(2, 64), (8, 2048), (3, 100)])
def test_gather_sum_kernel(top_k, hidden):
    """Tokens with 0 .. top_k rows each (as under expert parallelism), rows in a random order."""
    tokens = 37
    per_token = torch.randint(0, top_k + 1, (tokens,), device=DEVICE)
    token_ptr = torch.cat([per_token.new_zeros(1), per_token.cumsum(0)])
    num_rows = int(token_ptr[-1])
    rows = randn(num_rows, hidden)
    token_rows = torch.randperm(num_rows, device=DEVICE)
    got = combine.gather_sum(rows, token_rows, token_ptr, "triton")
    want = combine.gather_sum(rows.float(), token_rows, token_ptr, "torch")
    assert got.dtype == rows.dtype and got.shape == (tokens, hidden)
    assert rel(got, want) < TOL
