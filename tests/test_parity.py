"""automoe vs the HF reference (experts_implementation="eager") from the same checkpoint, fp32 CPU."""

from __future__ import annotations

import pytest
import torch
from tiny_configs import make_config
from transformers import AutoModelForCausalLM

from automoe import AutoMoEForCausalLM
from automoe.families import NAMED_FAMILIES
from automoe.families.recognize import find_experts
from automoe.moe.block import MoEBlock
from automoe.numerics import relative_error as rel

ACCELERATED = [
    "qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss",  # named
    "glm4_moe", "flex_olmo", "dots1",  # recognised by structure alone
    "nemotron_h", "nemotron_h_latent",  # Mamba2 + attention + non-gated relu2 experts; LatentMoE projections
]


@pytest.fixture(scope="module", params=ACCELERATED)
def checkpoint(request, tmp_path_factory):
    family = request.param
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(family))
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    return family, path


@pytest.mark.parametrize(
    "backend,kernels", [("grouped_mm", "auto"), ("grouped_mm", "off"), ("per_expert", "auto")]
)
def test_loss_logits_and_grads_match_hf(checkpoint, backend, kernels):
    family, path = checkpoint
    ref = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager", dtype=torch.float32)
    options = {"experts_backend": backend, "kernels": kernels}
    ours = AutoMoEForCausalLM.from_pretrained(path, dtype=torch.float32, automoe_options=options)
    assert type(ours) is type(ref), "the family's own HF class comes back"
    blocks = [m for m in ours.modules() if isinstance(m, MoEBlock)]
    assert blocks, f"{family}: no MoE block was replaced"
    assert all(b.experts.backend == backend for b in blocks)
    ref.train()
    ours.train()
    ids = torch.randint(0, ref.config.vocab_size, (2, 16))
    out_ref = ref(input_ids=ids, labels=ids)
    out = ours(input_ids=ids, labels=ids)
    assert rel(out.logits, out_ref.logits) < 1e-4
    assert rel(out.loss, out_ref.loss) < 1e-4
    if getattr(out_ref, "aux_loss", None) is not None:
        assert out.aux_loss is not None
        assert rel(out.aux_loss, out_ref.aux_loss) < 1e-4
    out_ref.loss.backward()
    out.loss.backward()
    ref_params = dict(ref.named_parameters())
    assert [n for n, _ in ours.named_parameters()] == list(ref_params), "same parameter names in the same order"
    for name, param in ours.named_parameters():
        ref_grad = ref_params[name].grad
        if ref_grad is None:
            assert param.grad is None or param.grad.abs().max() == 0, name
            continue
        assert param.grad is not None, f"{family}: {name} got no gradient"
        assert rel(param.grad, ref_grad) < 1e-3, f"{family}: gradient of {name}"


def test_every_moe_layer_is_replaced_and_router_gets_gradient(checkpoint):
    family, path = checkpoint
    ours = AutoMoEForCausalLM.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    hf_blocks = [n for n, m in ref.named_modules() if find_experts(m) is not None]
    our_blocks = {n: m for n, m in ours.named_modules() if isinstance(m, MoEBlock)}
    assert hf_blocks and list(our_blocks) == hf_blocks
    ours.train()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    ours(input_ids=ids, labels=ids).loss.backward()
    for name, block in our_blocks.items():
        grad = getattr(block, block.spec.router_attr).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, f"{name}: router gradient"


def test_generate_matches_hf(checkpoint):
    family, path = checkpoint
    ref = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    ours = AutoMoEForCausalLM.from_pretrained(path).eval()
    prompt = torch.randint(3, ref.config.vocab_size, (1, 6))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kwargs), ref.generate(prompt, **kwargs))


def test_named_families_are_covered():
    """Every family accelerated without the numerical check (NAMED_FAMILIES) has its parity test here, and the
    check-protected structural path has several."""
    model_types = {family: make_config(family).model_type for family in ACCELERATED}
    assert NAMED_FAMILIES <= set(model_types.values()), NAMED_FAMILIES - set(model_types.values())
    structural = {family for family, model_type in model_types.items() if model_type not in NAMED_FAMILIES}
    assert len(structural) >= 3
