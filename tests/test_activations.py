"""Every expert activation a config can name is recognised for what it computes, and the fused path computes
exactly that function: the Triton kernels on a GPU in bf16, or on CPU through TRITON_INTERPRET=1 in fp32; the
torch path everywhere. Would have caught ExpertsSpec.act_name defaulting to SiLU for a GELU model."""

from __future__ import annotations

import pytest
import torch
from tiny_configs import make_config
from transformers import AutoModelForCausalLM
from transformers.activations import ACT2FN

from automoe import AutoMoEForCausalLM
from automoe.families.activation import identify_activation
from automoe.kernels import swiglu
from automoe.kernels.select import interpreting, triton_available
from automoe.moe.block import MoEBlock
from automoe.moe.spec import ExpertsSpec

GPU = torch.cuda.is_available()
KERNELS = triton_available() and (GPU or interpreting())
needs_kernels = pytest.mark.skipif(not KERNELS, reason="needs triton and a GPU (or TRITON_INTERPRET=1 on CPU)")
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
TOL = 1e-2 if GPU else 1e-5

HIDDEN_ACTS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_python": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu",
    "relu2": "relu2", "mish": None, "gelu_10": None, "tanh": None,
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("hidden_act,name", HIDDEN_ACTS.items())
def test_act_fn_is_named_by_what_it_computes(hidden_act, name):
    assert identify_activation(ACT2FN[hidden_act]) == name


@pytest.mark.parametrize("hidden_act", ["silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu", "relu2"])
@pytest.mark.parametrize("layout", ["concatenated", "interleaved", "no gate"])
def test_torch_backward_is_the_derivative_of_the_act_fn(hidden_act, layout):
    """The torch backward writes each named activation's derivative out (it runs below autograd, inside the
    routed-experts op): it equals autograd through HF's own act_fn, on CPU in fp32."""
    act_fn = ACT2FN[hidden_act]
    spec = ExpertsSpec(num_experts=4, hidden_size=16, intermediate_size=40, interleaved=layout == "interleaved",
                       has_gate=layout != "no gate", act_name=identify_activation(act_fn))
    h = (torch.randn(29, 80 if spec.has_gate else 40) * 3).requires_grad_()
    w = torch.rand(29, requires_grad=True)
    out = swiglu.weighted_activation_reference(h, w, spec, act_fn)
    grad = torch.randn_like(out)
    out.backward(grad)
    dh, dw, act = swiglu.weighted_activation_backward(grad, h.detach(), w.detach(), spec, "torch")
    assert rel(act, out.detach()) < 1e-6
    assert rel(dh, h.grad) < 1e-5 and rel(dw, w.grad) < 1e-5


@needs_kernels
@pytest.mark.parametrize("hidden_act", ["silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu", "relu2"])
@pytest.mark.parametrize("layout", ["concatenated", "interleaved", "no gate"])
def test_kernel_computes_the_named_activation(hidden_act, layout):
    act_fn = ACT2FN[hidden_act]
    spec = ExpertsSpec(num_experts=4, hidden_size=16, intermediate_size=40, interleaved=layout == "interleaved",
                       has_gate=layout != "no gate", act_name=identify_activation(act_fn))
    h = (torch.randn(29, 80 if spec.has_gate else 40, device=DEVICE) * 3).to(DTYPE)
    w = torch.rand(29, device=DEVICE)
    grad = torch.randn(29, 40, device=DEVICE).to(DTYPE)
    out = swiglu.weighted_activation(h, w, spec, act_fn, "triton")
    assert rel(out, swiglu.weighted_activation_reference(h.float(), w, spec, act_fn)) < TOL
    got = swiglu.weighted_activation_backward(grad, h, w, spec, "triton")
    want = swiglu.weighted_activation_backward(grad.float(), h.float(), w, spec, "torch")
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < TOL


def _gelu_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_config("qwen3_moe", hidden_act="gelu_pytorch_tanh"))


def test_recognition_names_the_models_activation():
    ours = AutoMoEForCausalLM.from_config(_gelu_model().config)
    specs = {m.spec.experts.act_name for m in ours.modules() if isinstance(m, MoEBlock)}
    assert specs == {"gelu_tanh"}


@needs_kernels
def test_non_silu_model_matches_hf_through_the_kernels():
    ref = _gelu_model().to(DEVICE)
    ours = AutoMoEForCausalLM.from_config(ref.config, automoe_options={"kernels": "triton"}).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(3, ref.config.vocab_size, (2, 16), device=DEVICE)
    out_ref, out = ref(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert rel(out.logits, out_ref.logits) < 1e-4
    out_ref.loss.backward()
    out.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        if ref_params[name].grad is not None:
            assert rel(param.grad, ref_params[name].grad) < 1e-3, name
