"""Each fused kernel's torch path against its plain reference (fp32 CPU), and the model-level patches against
plain transformers. The Triton paths are held to the same references in test_kernels_triton.py."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_configs import make_config
from torch import nn
from transformers import AutoModelForCausalLM

from automoe import AutoMoEForCausalLM
from automoe.kernels import AdamW, apply_kernels, cross_entropy, moe, rmsnorm, rope, swiglu
from automoe.kernels.router import fused_route
from automoe.kernels.select import use_triton
from automoe.moe.dispatch import LocalDispatcher, expert_rows
from automoe.moe.experts import Experts
from automoe.moe.router import Router
from automoe.moe.spec import ExpertsSpec, RouterSpec
from automoe.numerics import relative_error as rel
from automoe.options import AutoMoEOptions

SPECS = {
    "swiglu": ExpertsSpec(num_experts=6, hidden_size=16, intermediate_size=8, act_name="silu"),
    "gpt_oss": ExpertsSpec(num_experts=6, hidden_size=16, intermediate_size=8, activation="clamped_swiglu",
                           interleaved=True, transposed=True, swiglu_limit=1.0),
}


def make_experts(spec: ExpertsSpec) -> Experts:
    experts = Experts(spec, nn.SiLU(), "grouped_mm")
    e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
    gate_up = torch.randn(e, h, 2 * i) if spec.transposed else torch.randn(e, 2 * i, h)
    down = torch.randn(e, i, h) if spec.transposed else torch.randn(e, h, i)
    experts.gate_up_proj = nn.Parameter(gate_up * 0.3)
    experts.down_proj = nn.Parameter(down * 0.3)
    return experts


@pytest.mark.parametrize("name", list(SPECS))
def test_weighted_activation_backward_matches_autograd(name):
    spec = SPECS[name]
    h = torch.randn(20, 2 * spec.intermediate_size, requires_grad=True)
    w = torch.rand(20, requires_grad=True)
    out = swiglu.weighted_activation_reference(h, w, spec, nn.SiLU())
    grad = torch.randn_like(out)
    out.backward(grad)
    dh, dw, act = swiglu.weighted_activation_backward(grad, h.detach(), w.detach(), spec, "torch")
    assert rel(act, out.detach()) < 1e-6
    assert rel(dh, h.grad) < 1e-6 and rel(dw, w.grad) < 1e-6


def composed(experts: Experts, x, ids, weights):
    """The core's dispatch -> experts -> combine, autograd all the way: the reference of RoutedExperts."""
    return LocalDispatcher(experts.spec.num_experts)(x, ids, weights, experts)[0]


def fused(experts: Experts, x, ids, weights, mode="torch"):
    """The same through the fused Function."""
    return moe.routed_experts(experts, x, expert_rows(ids, weights, experts.spec.num_experts, ids.numel()), mode)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("recompute", [False, True])
def test_routed_experts_match_composed_path(name, recompute, monkeypatch):
    if recompute:
        monkeypatch.setattr(moe, "RECOMPUTE_ABOVE_ROWS", 0)
    spec = SPECS[name]
    experts = make_experts(spec)
    tokens, top_k = 24, 3
    x = torch.randn(tokens, spec.hidden_size, requires_grad=True)
    logits = torch.randn(tokens, spec.num_experts)
    logits[:, 0] = -1e4  # expert 0 gets no token: empty groups must work
    ids = logits.topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, requires_grad=True)
    ref = composed(experts, x, ids, weights)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, weights, experts.gate_up_proj, experts.down_proj), grad)
    out = fused(experts, x, ids, weights)
    grads = torch.autograd.grad(out, (x, weights, experts.gate_up_proj, experts.down_proj), grad)
    assert rel(out, ref) < 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.shape == want.shape and got.is_contiguous()
        assert rel(got, want) < 1e-5


def test_rms_norm_matches_hf_forward_and_backward():
    norm = AutoModelForCausalLM.from_config(make_config("qwen3_moe")).model.norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, norm.weight.shape[0], requires_grad=True)
    ref = norm(x)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, norm.weight), grad)
    out = rmsnorm.rms_norm(x, norm.weight, norm.variance_epsilon, "torch")
    grads = torch.autograd.grad(out, (x, norm.weight), grad)
    assert rel(out, ref) < 1e-6
    assert rel(grads[0], ref_grads[0]) < 1e-5 and rel(grads[1], ref_grads[1]) < 1e-5


class OnePlusNorm(nn.Module):
    """Gemma-style: scales by (1 + weight). Named like an RMSNorm, but computes something else."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = 1e-6

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


OnePlusNorm.__name__ = "GemmaLikeRMSNorm"


def test_rms_norm_patch_skips_a_norm_that_computes_something_else():
    model = nn.Sequential(OnePlusNorm(8))
    assert rmsnorm.patch_rms_norms(model, "torch") == 0
    assert type(model[0]) is OnePlusNorm


def test_rope_torch_path_matches_hf_forward_and_backward():
    from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

    original = hf.apply_rotary_pos_emb
    q = torch.randn(2, 7, 4, 8).transpose(1, 2).requires_grad_(True)  # HF's non-contiguous view, Hq != Hk
    k = torch.randn(2, 7, 2, 8).transpose(1, 2).requires_grad_(True)
    cos, sin = torch.randn(1, 7, 8), torch.randn(1, 7, 8)
    ref = original(q, k, cos, sin)
    grads = [torch.randn_like(r) for r in ref]
    out = rope.rope(q, k, cos, sin, "torch")
    for got, want in zip((*out, *torch.autograd.grad(out, (q, k), grads)),
                         (*ref, *torch.autograd.grad(ref, (q, k), grads)), strict=True):
        assert torch.equal(got, want)


def test_rope_probe_rejects_another_rotation():
    def interleaved(q, k, cos, sin):  # pairs (0, 1), (2, 3), ... instead of the two halves
        def turn(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + turn(q) * sin, k * cos + turn(k) * sin

    assert rope.computes_rope(rope.rope_reference)
    assert not rope.computes_rope(interleaved)
    with torch.device("meta"):  # models are often built under a default device (the bench: cuda); the probe is CPU
        assert rope.computes_rope(rope.rope_reference)


def test_rope_patch_is_scoped_to_automoe_models(monkeypatch):
    from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

    fused, hf_rotations = [], []
    original = rope.rope
    monkeypatch.setattr(rope, "rope", lambda *a: fused.append(a[-1]) or original(*a))
    apply_rotary_pos_emb, rotate_half = hf.apply_rotary_pos_emb, hf.rotate_half
    monkeypatch.setattr(hf, "rotate_half", lambda x: hf_rotations.append(x.shape) or rotate_half(x))
    torch.manual_seed(0)
    ours = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"))
    attention = ours.model.layers[0].self_attn
    assert isinstance(attention, hf.Qwen3MoeAttention) and type(attention) is not hf.Qwen3MoeAttention
    assert hf.apply_rotary_pos_emb is apply_rotary_pos_emb, "the modeling module's global stays HF's"
    ref = AutoModelForCausalLM.from_config(make_config("qwen3_moe"))  # built after the patch: stays plain
    assert type(ref.model.layers[0].self_attn) is hf.Qwen3MoeAttention
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 128, (2, 12))
    hf_rotations.clear()  # the probe's own calls
    out_ref = ref(input_ids=ids, labels=ids)
    assert fused == [] and len(hf_rotations) == 4, "the plain model calls the original function"
    hf_rotations.clear()
    out = ours(input_ids=ids, labels=ids)
    assert fused == ["auto", "auto"] and hf_rotations == []
    assert rel(out.logits, out_ref.logits) < 1e-5 and rel(out.loss, out_ref.loss) < 1e-5
    out.loss.backward()
    out_ref.loss.backward()
    q_proj, ref_q_proj = attention.q_proj.weight, ref.model.layers[0].self_attn.q_proj.weight
    assert rel(q_proj.grad, ref_q_proj.grad) < 1e-5


def test_rope_swap_sees_through_hf_decorators_and_refuses_opaque_ones():
    """HF's attention forwards sit under deprecate_kwarg: the derived forward copies that wrapper around its own inner
    function. A decorator that hides the inner function elsewhere than in its closure leaves the module plain."""
    import functools

    from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

    def opaque(fn):
        holder = [fn]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return holder[0](*args, **kwargs)

        return wrapper

    class HiddenForward(hf.Qwen3MoeAttention):
        forward = opaque(hf.Qwen3MoeAttention.forward)

    model = nn.ModuleList([object.__new__(HiddenForward), object.__new__(hf.Qwen3MoeAttention)])
    for module in model:
        nn.Module.__init__(module)
    assert rope.patch_rope(model, "torch") == 1
    assert type(model[0]) is HiddenForward and rope.SWAP.owns(model[1])


def test_partial_rotary_keeps_the_original_path(monkeypatch):
    fused = []
    original = rope.rope
    monkeypatch.setattr(rope, "rope", lambda *a: fused.append(a[-1]) or original(*a))
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(make_config("glm4_moe"), experts_implementation="eager")
    ours = AutoMoEForCausalLM.from_config(make_config("glm4_moe"))
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 128, (2, 12))
    assert rel(ours(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5
    assert fused == [], "cos/sin narrower than head_dim: not the shape the probe verified"


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 64 * 4])
def test_linear_cross_entropy_matches_logits_path(chunk_bytes, monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", chunk_bytes)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(64, 16, requires_grad=True)
    labels = torch.randint(0, 64, (2, 9))
    labels[0, 3] = labels[1, 0] = -100
    for num_items in (None, 7):
        logits = hidden @ weight.t()
        shifted = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        reduction = "mean" if num_items is None else "sum"
        ref = nn.functional.cross_entropy(logits.view(-1, 64), shifted.reshape(-1), reduction=reduction)
        ref = ref if num_items is None else ref / num_items
        ref_grads = torch.autograd.grad(ref * 3.0, (hidden, weight))
        loss = cross_entropy.causal_lm_loss(hidden, weight, labels, "torch", num_items)
        grads = torch.autograd.grad(loss * 3.0, (hidden, weight))
        assert rel(loss, ref) < 1e-6
        assert rel(grads[0], ref_grads[0]) < 1e-5 and rel(grads[1], ref_grads[1]) < 1e-5


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_fused_loss_model_matches_hf_loss_aux_loss_and_grads(family):
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(make_config(family), experts_implementation="eager")
    ours = AutoMoEForCausalLM.from_config(make_config(family), automoe_options={"fused_loss": True})
    ours.load_state_dict(ref.state_dict())
    out = assert_trains_like_hf(ours, ref)
    assert out.logits is None, "training with labels: no [tokens, vocab] logits"


def assert_trains_like_hf(ours: nn.Module, ref: nn.Module):
    """Loss, aux loss and every gradient of one training step, then the eval logits, against plain HF."""
    ids = torch.randint(0, 128, (2, 12))
    out_ref, out = ref(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert rel(out.loss, out_ref.loss) < 1e-5
    if getattr(out_ref, "aux_loss", None) is not None:
        assert rel(out.aux_loss, out_ref.aux_loss) < 1e-5
    out.loss.backward()
    out_ref.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        if ref_params[name].grad is not None:
            assert rel(param.grad, ref_params[name].grad) < 1e-4, name
    ours.eval()
    assert rel(ours(input_ids=ids).logits, ref.eval()(input_ids=ids).logits) < 1e-5
    return out


def test_apply_kernels_routes_through_the_fused_router_and_still_matches_hf():
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(make_config("qwen3_moe"), experts_implementation="eager")
    ours = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), automoe_options={"kernels": "off"})
    ours.load_state_dict(ref.state_dict())
    routers = [module for module in ours.modules() if isinstance(module, Router)]
    assert all(router.fused_route is None for router in routers)
    assert apply_kernels(ours, AutoMoEOptions(kernels="torch"))["routers"] == len(routers) == 2
    calls = []
    for router in routers:  # count the calls: the kernel's torch path is `route` itself
        fused = router.fused_route
        router.fused_route = lambda logits, spec, fused=fused: calls.append(spec) or fused(logits, spec)
    assert_trains_like_hf(ours, ref)
    assert len(calls) == 2 * len(routers), "one training and one eval forward through each router"


def test_sigmoid_routers_keep_the_reference():
    model = AutoMoEForCausalLM.from_config(make_config("deepseek_v3"), automoe_options={"kernels": "off"})
    assert apply_kernels(model, AutoMoEOptions(kernels="torch"))["routers"] == 0
    with pytest.raises(ValueError, match="sigmoid"):
        fused_route(torch.zeros(2, 8), RouterSpec(num_experts=8, top_k=2, score_func="sigmoid"), "torch")


def test_packed_sequences_with_document_masking_match_hf_sdpa():
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(make_config("qwen3_moe"), attn_implementation="sdpa")
    ours = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"))
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == "automoe_sdpa"
    ids = torch.randint(0, 128, (1, 16))
    positions = torch.cat([torch.arange(10), torch.arange(6)])[None]
    packed = ours(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert rel(packed, ref(input_ids=ids, position_ids=positions, use_cache=False).logits) < 1e-5
    alone = ours(input_ids=ids[:, 10:]).logits
    assert rel(packed[:, 10:], alone) < 1e-5, "the second document must not see the first"


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_building_under_a_device_context_patches_everything(device):
    with torch.device(device):
        model = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), automoe_options={"fused_loss": True})
    assert model.config._attn_implementation == "automoe_sdpa"
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    attentions = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert len(norms) == 2 * 2 + 2 * 2 + 1 and len(attentions) == 2 and len(experts) == 2, "every layer's modules"
    for module, swap in [(m, rmsnorm.SWAP) for m in norms] + [(m, rope.SWAP) for m in attentions]:
        assert swap.owns(module) and module.automoe_kernels == "auto", type(module).__name__
    assert all(e.fused_forward is not None for e in experts)
    assert "forward" in vars(model), "fused loss forward on this instance"


def test_kernels_off_leaves_norms_and_attention_plain():
    model = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"), automoe_options={"kernels": "off"})
    assert model.config._attn_implementation == "sdpa"
    assert type(model.model.norm).__mro__[1] is nn.Module
    assert all(e.fused_forward is None for e in model.modules() if isinstance(e, Experts))


def test_adamw_matches_torch_adamw_over_steps():
    torch.manual_seed(0)
    params = [torch.randn(33, 7), torch.randn(5)]
    ours = [nn.Parameter(p.clone()) for p in params]
    ref = [nn.Parameter(p.clone()) for p in params]
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt, ref_opt = AdamW(ours, kernels="torch", **kw), torch.optim.AdamW(ref, foreach=False, **kw)
    for _ in range(4):
        for a, b in zip(ours, ref, strict=True):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref, strict=True):
        assert rel(a, b) < 1e-6
        assert rel(opt.state[a]["exp_avg_sq"], ref_opt.state[b]["exp_avg_sq"]) < 1e-6
    assert set(opt.state_dict()["state"][0]) == set(ref_opt.state_dict()["state"][0])


def test_adamw_in_backward_gives_the_same_update_and_frees_grads():
    # The reference is the same automoe model stepped by torch's AdamW after backward: both see bit-identical
    # gradients, so only the optimizer differs (an HF reference would add the models' fp32 rounding
    # differences, which Adam's normalisation amplifies on near-zero gradients).
    torch.manual_seed(0)
    ours = AutoMoEForCausalLM.from_config(make_config("qwen3_moe"))
    ref = copy.deepcopy(ours)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    opt = AdamW(ours.parameters(), kernels="torch", in_backward=True, **kw)
    ref_opt = torch.optim.AdamW(ref.parameters(), foreach=False, **kw)
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 10))
        ref(input_ids=ids, labels=ids).loss.backward()
        ours(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in ours.parameters()), "in backward: each gradient is used and freed"
        ref_opt.step()
        ref_opt.zero_grad()
        opt.step()
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        assert rel(param, ref_params[name]) < 1e-6, name


def test_bad_kernel_choices_say_how_to_fix():
    with pytest.raises(ValueError, match="unknown kernels"):
        AutoMoEOptions(kernels="fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="kernels': 'auto'"):
            use_triton("triton", torch.zeros(1))
    with pytest.raises(ValueError, match="non-negative float"):
        AdamW([nn.Parameter(torch.zeros(1))], lr=torch.tensor(1e-3))


@pytest.mark.parametrize("recompute", [False, True])
def test_routed_experts_with_gpt_oss_biases_match_composed_path(recompute, monkeypatch):
    if recompute:
        monkeypatch.setattr(moe, "RECOMPUTE_ABOVE_ROWS", 0)
    torch.manual_seed(0)
    spec = ExpertsSpec(num_experts=6, hidden_size=20, intermediate_size=8, activation="clamped_swiglu",
                       interleaved=True, transposed=True, has_bias=True, swiglu_limit=1.0)
    experts = make_experts(spec)
    experts.gate_up_proj_bias = nn.Parameter(torch.randn(6, 16) * 0.5)
    experts.down_proj_bias = nn.Parameter(torch.randn(6, 20) * 0.5)
    x = torch.randn(24, 20, requires_grad=True)
    logits = torch.randn(24, 6)
    logits[:, 0] = -1e4  # an expert with no token: its bias gradients are zero
    ids = logits.topk(3, dim=-1).indices
    weights = torch.rand(24, 3, requires_grad=True)
    params = (x, weights, *experts.parameters())
    ref = composed(experts, x, ids, weights)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, grad)
    out = fused(experts, x, ids, weights)
    assert rel(out, ref) < 1e-5
    for got, want in zip(torch.autograd.grad(out, params, grad), ref_grads, strict=True):
        assert got.shape == want.shape and rel(got, want) < 1e-5


def test_gpt_oss_blocks_take_the_fused_routed_path():
    model = AutoMoEForCausalLM.from_config(make_config("gpt_oss"))
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(e.spec.has_bias and e.fused_forward is not None for e in experts)
