"""Every `@use_experts_implementation` model type of the installed transformers, built from a tiny config and
loaded through AutoMoEForCausalLM: accelerated with HF parity, or refused with the reason; never wrong."""

from __future__ import annotations

import warnings

import pytest
import torch
from experts_sweep import EXPERTS, TOP_K, experts_model_types, has_causal_lm, tiny_config
from transformers import AutoModelForCausalLM

from automoe import AutoMoEForCausalLM
from automoe.moe.block import MoEBlock
from automoe.optimize import AutoMoEWarning

MIN_ACCELERATED = 0.9
MAX_PARAMETERS = 20_000_000  # a "tiny" config the generic shrinking leaves larger than this would exhaust CI's memory


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _seeded(model, **inputs):
    """A training forward from one seed: a family that samples in training (PhiMoE's sparsemixer routing) draws
    the same numbers in HF and in automoe, which keeps HF's router and calls it where HF's block does."""
    torch.manual_seed(2)
    return model(**inputs)


def _build(model_type: str):
    config = tiny_config(model_type)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still has {size / 1e6:.0f}M parameters")
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config, experts_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # what HF initialises to zeros gets values, so that a path that ignored it would show
        for key, tensor in ref.state_dict().items():
            gen = torch.Generator().manual_seed(len(key))
            if "bias" in key.rsplit(".", 1)[-1] and tensor.is_floating_point() and not tensor.any():
                tensor.normal_(0.0, 0.05, generator=gen)  # routing corrections, AFMoE's expert_bias
            elif tensor.dtype == torch.int64 and tensor.dim() == 2 and tensor.shape[1] == TOP_K and not tensor.any():
                # a token-to-experts table (DeepSeek-V4's hash routing): distinct experts per token, as trained ones
                tensor.copy_(torch.rand(tensor.shape[0], EXPERTS, generator=gen).argsort(dim=1)[:, :TOP_K])
    ids = torch.randint(3, config.get_text_config().vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    ref.train()(input_ids=ids[:1, :4], labels=ids[:1, :4])  # one tiny forward: the model runs at all
    return config, ref, ids


def sweep_one(model_type: str) -> tuple[str, str]:
    """('accelerated', blocks) when automoe took it and matches HF, ('refused', why) when it stayed HF, and
    ('WRONG', what differs) when an accelerated model does not match."""
    config, ref, ids = _build(model_type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AutoMoEWarning)
        ours = AutoMoEForCausalLM.from_config(config, dtype=torch.float32)
    why = "; ".join(str(w.message) for w in caught if issubclass(w.category, AutoMoEWarning))
    blocks = sum(isinstance(m, MoEBlock) for m in ours.modules())
    if not blocks:
        return "refused", why or "no warning"
    ours.load_state_dict(ref.state_dict())
    ours.train()
    out_ref, out = (_seeded(model, input_ids=ids, labels=ids) for model in (ref, ours))
    problems = [f"{name} {_rel(a, b):.1e}" for name, a, b in
                (("loss", out.loss, out_ref.loss), ("logits", out.logits, out_ref.logits)) if not _rel(a, b) < 1e-4]
    out_ref.loss.backward()
    out.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        ref_grad = ref_params[name].grad
        if ref_grad is None or not ref_grad.abs().max() > 0:
            if param.grad is not None and param.grad.abs().max() > 0:
                problems.append(f"{name} has a gradient HF does not")
        elif param.grad is None:
            problems.append(f"grad {name} missing")
        elif not _rel(param.grad, ref_grad) < 1e-3:
            problems.append(f"grad {name} {_rel(param.grad, ref_grad):.1e}")
    if problems:
        return "WRONG", ", ".join(problems[:4])
    return "accelerated", f"{blocks} block(s)" + (f" ({why})" if why else "")


@pytest.fixture(scope="module")
def table() -> dict[str, tuple[str, str]]:
    torch.set_num_threads(1)
    rows = {}
    print("\nmodel type           | result      | why")
    for model_type in filter(has_causal_lm, experts_model_types()):
        try:
            _build(model_type)
        except Exception as err:  # a tiny config the generic shrinking cannot build is out of the sweep
            rows[model_type] = ("no tiny config", f"{type(err).__name__}: {str(err).splitlines()[0][:80]}")
        else:
            rows[model_type] = sweep_one(model_type)
        print(f"{model_type:20s} | {rows[model_type][0]:11s} | {rows[model_type][1]}", flush=True)
    return rows


def test_no_model_type_is_accelerated_wrongly(table):
    wrong = {t: why for t, (result, why) in table.items() if result == "WRONG"}
    assert not wrong, wrong


def test_most_model_types_are_accelerated(table):
    """Issue 16's line: at least 90% of the model types whose tiny config builds (transformers 5.24: 47 of 49,
    5.17: 36 of 39 on 2026-12-02)."""
    built = [t for t, (result, _) in table.items() if result != "no tiny config"]
    accelerated = [t for t in built if table[t][0] == "accelerated"]
    assert len(built) >= 30, "the sweep builds too few tiny configs to mean anything"
    assert len(accelerated) >= MIN_ACCELERATED * len(built), {t: table[t] for t in built if t not in accelerated}


# a family that needs each mechanism of issue 16 beyond the named families' (the version's, where it has it)
NEEDS = {
    "afmoe": "HF's router kept, called on [batch, seq, hidden] with the block's own expert_bias",
    "minimax_m2": "HF's router kept, with the block's own e_score_correction_bias",
    "ernie4_5_moe": "HF's router kept (a corrected softmax in a submodule)",
    "hunyuan_v1_moe": "HF's router kept (its weight in a submodule)",
    "phimoe": "HF's router kept (sparsemixer, sampled in training)",
    "flint": "sigmoid router without a correction bias",
    "hy_v4": "HF's own _apply_gate (clamped SwiGLU without an act_fn)",
    "deepseek_v4": "HF's hash router kept, given the block's input_ids; HF's own _apply_gate",
    "lfm2_moe": "an act_fn that is a function, not a module",
    "axk1": "a norm after the combined routed and shared experts",
    "cohere2_moe": "routed and shared experts averaged",
}


def test_families_needing_each_mechanism_are_accelerated(table):
    refused = {t: table[t] for t in NEEDS if t in table and table[t][0] != "accelerated"}
    assert not refused, {t: (NEEDS[t], *table[t]) for t in refused}
