"""LoRA on fused experts computed on the routed tokens, held to HF + peft (eager experts, fp32 CPU)."""

from __future__ import annotations

import collections
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tiny_configs import make_config
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from automoe import AutoMoEForCausalLM
from automoe.families.recognize import experts_spec
from automoe.kernels.moe import fused_experts_fn
from automoe.moe.adopt import adopt_tensors
from automoe.moe.block import MoEBlock
from automoe.moe.dispatch import expert_rows
from automoe.moe.experts import Experts
from automoe.moe.lora import adapter_factors, split_param_wrappers

FAMILIES = ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss", "qwen2_moe"]
# an expert intermediate size with 2I != H, so a projection adapted the wrong way round cannot match by shape
INTERMEDIATE_KEY = {"qwen3_moe": "moe_intermediate_size", "qwen2_moe": "moe_intermediate_size",
                    "deepseek_v3": "moe_intermediate_size"}
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def lora_config(r: int = 4, **kwargs) -> LoraConfig:
    # init_lora_weights=False: B is random too (peft's default zero B would give A no gradient to compare)
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["o_proj"], target_parameters=EXPERT_TARGETS,
                      init_lora_weights=False, **kwargs)


def hf_peft_model(family: str, config: LoraConfig | None = None):
    torch.manual_seed(0)
    hf_config = make_config(family, **{INTERMEDIATE_KEY.get(family, "intermediate_size"): 24})
    model = AutoModelForCausalLM.from_config(hf_config, experts_implementation="eager", dtype=torch.float32)
    return get_peft_model(model, config or lora_config())


def every_expert_routing(num_tokens: int, top_k: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t picks experts (t*k + j) % E: distinct per token, every expert reached when T*k >= E; random
    softmax weights."""
    ids = (torch.arange(num_tokens)[:, None] * top_k + torch.arange(top_k)) % num_experts
    weights = torch.randn(num_tokens, top_k).softmax(-1)
    return ids, weights


def expert_adapters(wrapper, spec):
    """(the experts under peft's wrappers, gate/up factors, down factors) in fp32."""
    base, wrappers = split_param_wrappers(wrapper)
    return (base, *adapter_factors(wrappers, spec, torch.float32, spec.num_experts))


def moe_experts(peft_model):
    return [layer.mlp.experts for layer in peft_model.base_model.model.model.layers if hasattr(layer.mlp, "experts")]


def adapter_params(wrapper) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in wrapper.named_parameters() if "lora_" in n}


def automoe_experts(hf_experts, spec, path: str) -> Experts:
    """automoe's Experts holding the HF module's very tensors, on one of its three paths."""
    experts = Experts(spec, getattr(hf_experts, "act_fn", None), "per_expert" if path == "per_expert" else "grouped_mm")
    names = ["gate_up_proj", "down_proj"] + ["gate_up_proj_bias", "down_proj_bias"] * spec.has_bias
    adopt_tensors(experts, hf_experts, names)
    if path == "fused":
        experts.fused_forward = fused_experts_fn("torch")
    return experts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["fused", "grouped_mm", "per_expert"])
def test_routed_lora_matches_hf_peft(family, path):
    """One MoE layer's experts: automoe's routed-row LoRA (fused Function, composed grouped_mm, per-expert loop)
    against peft's W + B·A on HF's eager experts: output and the gradient of every adapter tensor, of the tokens and
    of the routing weights; every expert's adapter is trained."""
    model = hf_peft_model(family)
    wrapper = moe_experts(model)[-1]
    base, wrappers = split_param_wrappers(wrapper)
    assert base is wrapper.get_base_layer() and set(wrappers) == {"gate_up_proj", "down_proj"}
    spec = experts_spec(base)
    torch.manual_seed(1)
    x = torch.randn(12, spec.hidden_size, requires_grad=True)
    ids, weights = every_expert_routing(12, 2, spec.num_experts)
    weights.requires_grad_(True)
    probe = torch.randn(12, spec.hidden_size)
    adapters = adapter_params(wrapper)

    ref = wrapper(x, ids, weights)
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, weights, *adapters.values()])
    experts = automoe_experts(base, spec, path)
    out = experts(x, expert_rows(ids, weights, spec.num_experts, ids.numel()), adapters=wrappers)
    grads = torch.autograd.grad((out * probe).sum(), [x, weights, *adapters.values()])

    assert rel(out, ref) < 1e-4
    names = ["x", "routing weights", *adapters]
    for name, grad, ref_grad in zip(names, grads, ref_grads, strict=True):
        assert rel(grad, ref_grad) < 1e-3, f"{family}: gradient of {name}"
    for name, grad in zip(names[2:], grads[2:], strict=True):
        per_expert = grad.view(spec.num_experts, -1, grad.shape[-1]) if "lora_A" in name else (
            grad.view(grad.shape[0], -1, spec.num_experts).transpose(0, 2))
        assert (per_expert.flatten(1).abs().amax(1) > 0).all(), f"{family}: an expert of {name} got no gradient"


def fused_beside_peft(wrapper, experts, spec):
    """(automoe's fused experts with peft's adapters, peft's wrapper) on 10 tokens routed to every expert."""
    x = torch.randn(10, spec.hidden_size)
    ids, weights = every_expert_routing(10, 2, spec.num_experts)
    with torch.no_grad():
        ref = wrapper(x, ids, weights)
    rows = expert_rows(ids, weights, spec.num_experts, ids.numel())
    return automoe_experts(experts, spec, "fused")(x, rows, adapters=split_param_wrappers(wrapper)[1]), ref


def test_frozen_base_gets_no_gradient_and_ranks_pad():
    """With the base frozen (as peft leaves it) the Function returns no base-weight gradient; a rank that is not
    a multiple of 8 is zero-padded and computes the same."""
    model = hf_peft_model("qwen3_moe", lora_config(r=3))
    wrapper = moe_experts(model)[-1]
    spec = experts_spec(wrapper.get_base_layer())
    experts, gate_up, down = expert_adapters(wrapper, spec)
    assert gate_up[0].shape[-1] == 8 and down[1].shape[1] == 8
    assert not experts.gate_up_proj.requires_grad and not experts.down_proj.requires_grad
    out, ref = fused_beside_peft(wrapper, experts, spec)
    assert rel(out, ref) < 1e-4
    out.sum().backward()
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None
    assert all(p.grad is not None for p in adapter_params(wrapper).values())


def test_disabled_merged_and_inactive_adapters_add_nothing():
    """peft's own switches decide: disable_adapter(), merged weights and no active adapter give no factors."""
    model = hf_peft_model("qwen3_moe")
    wrapper = moe_experts(model)[-1]
    spec = experts_spec(wrapper.get_base_layer())
    with model.disable_adapter():
        assert expert_adapters(wrapper, spec)[1:] == (None, None)
    model.merge_adapter()
    assert expert_adapters(wrapper, spec)[1:] == (None, None)
    model.unmerge_adapter()
    assert all(f is not None for f in expert_adapters(wrapper, spec)[1:])


def test_two_active_adapters_sum():
    """Two adapters active at once (peft sums their deltas) give the concatenated-rank factors' output."""
    model = hf_peft_model("mixtral")
    model.add_adapter("second", lora_config(r=2))
    model.base_model.set_adapter(["default", "second"])
    wrapper = moe_experts(model)[-1]
    spec = experts_spec(wrapper.get_base_layer())
    experts, gate_up, down = expert_adapters(wrapper, spec)
    out, ref = fused_beside_peft(wrapper, experts, spec)
    assert gate_up[0].shape[-1] == 8 and rel(out, ref) < 1e-4


def test_wrong_orientation_is_named():
    """Adapters made for the other layout (GPT-OSS experts that did not declare is_transposed) are refused with
    the reason instead of computing something else."""
    model = hf_peft_model("gpt_oss")
    wrapper = moe_experts(model)[-1]
    spec = experts_spec(wrapper.get_base_layer())
    wrong = type(spec)(**{**spec.__dict__, "transposed": False, "hidden_size": 24, "intermediate_size": 16})
    with pytest.raises(ValueError, match="is_transposed"):
        expert_adapters(wrapper, wrong)


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    family = request.param
    torch.manual_seed(0)
    hf_config = make_config(family, **{INTERMEDIATE_KEY.get(family, "intermediate_size"): 24})
    path = tmp_path_factory.mktemp(family)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(path)
    return family, path


def peft_models(path, options: dict | None = None):
    """(HF eager experts + peft, automoe + peft) with the same LoraConfig and the same adapter values."""
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager"), lora_config())
    ours = get_peft_model(AutoMoEForCausalLM.from_pretrained(path, automoe_options=options), lora_config())
    set_peft_model_state_dict(ours, get_peft_model_state_dict(ref))
    return ref, ours


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kernels", ["auto", "off"])
def test_peft_on_automoe_matches_hf_peft(checkpoint, kernels):
    """Unchanged peft code on an automoe model: the same adapters (names, shapes), loss and logits, and the gradient
    of every adapter tensor, against HF's eager experts + peft; base weights and router stay frozen."""
    family, path = checkpoint
    ref, ours = peft_models(path, {"kernels": kernels})
    assert any(isinstance(m, MoEBlock) for m in ours.modules())
    ref_params, params = trainable(ref), trainable(ours)
    assert {n: p.shape for n, p in params.items()} == {n: p.shape for n, p in ref_params.items()}
    assert any("experts" in n for n in params) and all("lora_" in n for n in params)
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    out_ref, out = ref(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert rel(out.logits, out_ref.logits) < 1e-4
    assert rel(out.loss, out_ref.loss) < 1e-4
    out_ref.loss.backward()
    out.loss.backward()
    for name, param in params.items():
        assert param.grad is not None, f"{family}: {name} got no gradient"
        assert rel(param.grad, ref_params[name].grad) < 1e-3, f"{family}: gradient of {name}"
    assert all(p.grad is None for n, p in ours.named_parameters() if n not in params)


def test_every_expert_adapter_trains_under_a_router_reaching_every_expert(checkpoint):
    family, path = checkpoint
    model = get_peft_model(AutoMoEForCausalLM.from_pretrained(path, automoe_options={"router": "balanced"}),
                           lora_config())
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    model(input_ids=ids, labels=ids).loss.backward()
    for wrapper in moe_experts(model):
        for name, param in adapter_params(wrapper).items():
            grad = param.grad
            per_expert = grad.view(wrapper.num_experts, -1, grad.shape[-1]) if "lora_A" in name else (
                grad.view(grad.shape[0], -1, wrapper.num_experts).transpose(0, 2))
            assert (per_expert.flatten(1).abs().amax(1) > 0).all(), f"{family}: an expert of {name} got no gradient"


def test_adapter_loads_into_plain_hf_peft_and_merges(checkpoint, tmp_path):
    """peft's save_pretrained of the automoe model is a standard adapter: plain transformers + peft loads it and
    computes the same logits; merge_and_unload() gives the same logits and saves a plain HF checkpoint."""
    family, path = checkpoint
    _, ours = peft_models(path)
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    ours.eval()
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager"),
                                      tmp_path / "adapter").eval()
    with torch.no_grad():
        assert rel(plain(input_ids=ids).logits, logits) < 1e-4
    merged = ours.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert rel(merged(input_ids=ids).logits, logits) < 1e-4
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", experts_implementation="eager").eval()
    with torch.no_grad():
        assert rel(reloaded(input_ids=ids).logits, logits) < 1e-4


class OpCounter(TorchDispatchMode):
    """Counts the aten ops (by name) run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_lora_bench_model_checkpointing_and_fewer_layers():
    """The --lora bench's model: automoe + peft built without transformers' init; every activation checkpointing
    mode gives the same loss and adapter gradients and recomputes what it says in backward (attention: the
    attention kernel but no expert GEMM; layer and sac: one more forward's expert GEMMs); dropping layers leaves
    a smaller model that still trains."""
    import argparse

    from automoe.bench.lora import AC_MODES, build, keep_layers, set_checkpointing
    from automoe.bench.workload import make_config as bench_config

    config = bench_config("tiny")
    model = build("automoe", config, torch.device("cpu"), argparse.Namespace(seed=0, kernels="auto", rank=8))
    assert any(isinstance(m, MoEBlock) for m in model.modules())
    assert {p.dtype for p in trainable(model).values()} == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in trainable(model))
    assert any("experts.lora_A" in n for n in trainable(model)) and any("q_proj.lora_A" in n for n in trainable(model))
    for p in trainable(model).values():
        torch.nn.init.normal_(p, std=0.02)  # peft's zero B would leave A without gradient
    ids = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        with OpCounter() as forward:
            loss = model(input_ids=ids, labels=ids).loss
        with OpCounter() as backward:
            grads = torch.autograd.grad(loss, list(trainable(model).values()))
        return loss.detach(), grads, forward.counts, backward.counts

    loss, grads, forward, backward = loss_and_grads()
    attention_op = next(op for op in forward if "scaled_dot_product" in op)
    for mode in AC_MODES[1:]:
        set_checkpointing(model, mode)
        loss_ac, grads_ac, _, backward_ac = loss_and_grads()
        assert rel(loss_ac, loss) < 1e-3, mode
        assert all(rel(a, b) < 1e-2 for a, b in zip(grads_ac, grads, strict=True)), mode
        assert backward_ac[attention_op] == backward[attention_op] + forward[attention_op], mode
        recomputed = forward["_grouped_mm"] if mode != "attention" else 0
        assert backward_ac["_grouped_mm"] == backward["_grouped_mm"] + recomputed, mode
    set_checkpointing(model, "off")
    before = len(trainable(model))
    keep_layers(model, 1)
    assert len(model.get_base_model().model.layers) == 1 and len(trainable(model)) == before // 2
    loss_and_grads()


def finetune_lora(out, max_steps: int, resume: bool = False, **extra):
    from automoe.train.config import load_recipe
    from automoe.train.trainer import run

    overrides = {"lora.enabled": True, "lora.r": 4, "lora.alpha": 8, "output.dir": str(out),
                 "train.max_steps": max_steps, "train.save_every": 3, "train.batch_size": 4, "train.progress": False,
                 "eval.generate": False, "output.plot": False, "output.export": False, "schedule.warmup_steps": 2,
                 **extra}
    return run(load_recipe(overrides=list(overrides.items())), resume=resume)


def logged_losses(out) -> dict[int, float]:
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_finetune_lora_section_exports_adapter_and_merged_model_and_resumes(tmp_path):
    """`automoe finetune` with `lora.enabled`: peft's adapter in DIR/adapter loads onto the initial model in plain
    HF + peft and gives the exported merged model's logits; the run resumed from its step-3 checkpoint repeats
    the uninterrupted run's losses."""

    from automoe.train.config import load_recipe
    from automoe.train.model import build_config, build_tokenizer

    finetune_lora(tmp_path / "full", 6, **{"output.export": True, "train.log_every": 1})
    adapter, final = tmp_path / "full" / "adapter", tmp_path / "full" / "final"
    assert (adapter / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    recipe = load_recipe()
    torch.manual_seed(recipe.seed)  # the recipe's initial weights, as build_model draws them
    config = build_config(recipe.model, build_tokenizer(recipe.model), recipe.train.router_aux_loss_coef)
    initial = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, recipe.model.dtype))
    plain = PeftModel.from_pretrained(initial, adapter).eval()
    ids = torch.randint(3, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(plain(input_ids=ids).logits, merged(input_ids=ids).logits) < 1e-4
    full = logged_losses(tmp_path / "full")
    checkpoints = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003", "step_00000006"]
    shutil.rmtree(checkpoints / "step_00000006")  # the last step is checkpointed too: resume from step 3
    finetune_lora(tmp_path / "full", 6, resume=True, **{"train.log_every": 1})
    resumed = logged_losses(tmp_path / "full")  # the resumed run's steps 4-6 are logged last
    assert all(abs(resumed[s] - full[s]) <= 1e-5 * abs(full[s]) for s in (4, 5, 6)), (full, resumed)



def ep_lora_parity(paths: dict) -> None:
    """A scenario of tests/test_distributed_ep.py's two-rank run (its processes, so no extra start-up): automoe +
    peft at ep 2, each rank its own rows, against HF eager + peft on the concatenated batch. Each rank holds its
    experts' adapters (peft's layout for those experts); loss and every adapter gradient (experts and attention)
    match; the adapter saved after an AdamW step loads into plain HF + peft with the EP model's logits and the
    reference's after the same step."""
    import os

    import torch.distributed as dist

    from automoe import create_distributed_setup_from_config
    from automoe.distributed.adapters import distribute_adapters

    path, out = paths["qwen3_moe"], os.path.join(paths["tmp"], "ep-adapter")
    world, rank = dist.get_world_size(), dist.get_rank()
    setup = create_distributed_setup_from_config({"ep_size": world})
    torch.manual_seed(rank)  # peft draws different adapters on each rank: distribute_adapters keeps rank 0's
    ours = get_peft_model(AutoMoEForCausalLM.from_pretrained(path, distributed_setup=setup, dtype=torch.float32),
                          lora_config())
    distribute_adapters(ours, setup)
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager"), lora_config())
    params, ref_params = trainable(ours), trainable(ref)
    assert {n: p.shape for n, p in params.items()} == {n: p.shape for n, p in ref_params.items()}
    sharded = {n: p for n, p in params.items() if "experts" in n}
    assert sharded and all(p.to_local().numel() * world == p.numel() for p in sharded.values())
    with torch.no_grad():
        for name, param in params.items():
            ref_params[name].copy_(param.full_tensor() if name in sharded else param)
    ids = torch.randint(3, ours.config.vocab_size, (2 * world, 8), generator=torch.Generator().manual_seed(7))
    mine = ids[2 * rank: 2 * rank + 2]
    loss = ours(input_ids=mine, labels=mine).loss
    loss.backward()
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    assert rel(mean / world, ref_loss) < 1e-4
    for name, param in params.items():
        grad = param.grad.full_tensor() if name in sharded else param.grad
        assert rel(grad, ref_params[name].grad) < 1e-3, f"gradient of {name}"
    for model in (ours, ref):
        torch.optim.AdamW(trainable(model).values(), lr=1e-2).step()
    ours.eval()
    with torch.no_grad():
        logits = ours(input_ids=mine).logits
    ours.save_pretrained(out)
    if rank == 0:
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager"),
                                          out).eval()
        with torch.no_grad():
            assert rel(plain(input_ids=mine).logits, logits) < 1e-4
            assert rel(plain(input_ids=ids).logits, ref.eval()(input_ids=ids).logits) < 1e-4
