"""Expert parallelism + FSDP2 on CPU with gloo: 2 and 4 processes, ep_size 1, 2 and 4, each rank fed different
tokens, held to the single-process HF model on the concatenated batch.

Every rank's loss is the mean over its own tokens and token counts are equal, so the mean of the rank losses is
HF's loss on the concatenated batch, and FSDP's averaged gradients must equal HF's (1e-4 relative, fp32). The
tiny qwen3_moe config is used without the router aux loss, which is not a mean over tokens (it is a product of
per-expert means) and so does not split across ranks.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_lora import ep_lora_parity
from tiny_configs import make_config
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoModelForCausalLM

from automoe import AutoMoEForCausalLM, create_distributed_setup_from_config
from automoe.checkpoint.safetensors_io import SafetensorsFile
from automoe.distributed import clip_grad_norm_
from automoe.distributed.dispatch import AllToAllDispatcher, rows_per_destination
from automoe.moe.router import Router

TOKENS_PER_RANK = (2, 16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, scenarios: list, paths: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, kwargs in scenarios:
            try:
                SCENARIOS[name](paths, **kwargs)
            except Exception as err:
                raise AssertionError(f"rank {rank}, scenario {name} {kwargs}: {err}\n{traceback.format_exc()}") from err
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, scenarios: list, paths: dict) -> None:
    mp.spawn(_entry, args=(world, _free_port(), scenarios, paths), nprocs=world, join=True)


def _batch(world: int) -> torch.Tensor:
    rows, seq = TOKENS_PER_RANK
    return torch.randint(3, 128, (world * rows, seq), generator=torch.Generator().manual_seed(11))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _my_rows(ids: torch.Tensor) -> torch.Tensor:
    rows = TOKENS_PER_RANK[0]
    return ids[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def _check_expert_meshes(model, ep: int) -> int:
    count = 0
    for name, param in model.named_parameters():
        if ".experts." not in name:
            continue
        names = param.device_mesh.mesh_dim_names
        assert "ep" in names, (name, names)
        assert param.placements[names.index("ep")] == Shard(0), (name, param.placements)
        assert param.device_mesh.size(names.index("ep")) == ep
        count += 1
    assert count > 0
    return count


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _parity(paths: dict, family: str = "qwen3_moe", ep: int = 1, ac: str = "off", replicate: int = 1,
            param_dtype: str | None = None) -> None:
    """Gradients, loss, one AdamW step and save_pretrained, all against single-process HF."""
    ckpt = paths[family]
    world, rank = dist.get_world_size(), dist.get_rank()
    setup = create_distributed_setup_from_config(
        {"strategy": "fsdp2", "ep_size": ep, "activation_checkpointing": ac, "dp_replicate_size": replicate,
         "param_dtype": param_dtype}
    )
    model = AutoMoEForCausalLM.from_pretrained(ckpt, distributed_setup=setup, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    if world == 1 and param_dtype is None:  # nothing to shard or reduce: no FSDP2, no DTensor, the drop-in model
        assert not any(isinstance(m, FSDPModule) for m in model.modules())
        assert not any(isinstance(p, DTensor) for p in model.parameters())
    else:
        assert isinstance(model, FSDPModule)
        _check_expert_meshes(model, ep)
    assert all(layer.gradient_checkpointing == (ac != "off") for layer in model.model.layers)
    ids = _batch(world)
    mine = _my_rows(ids)
    model.train()
    ref.train()
    loss = model(input_ids=mine, labels=mine).loss
    loss.backward()
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    assert abs(mean.item() / world - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for (name, param), (ref_name, ref_param) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert name == ref_name
        assert _rel(_full(param.grad), ref_param.grad) <= 1e-4, name
    total = clip_grad_norm_(model.parameters(), 1e-3)
    ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3)
    assert abs(total.item() - ref_total.item()) <= 1e-5 * ref_total.item()
    for m in (model, ref):
        torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-3).step()
    out = os.path.join(paths["tmp"], f"saved-{family}-ep{ep}-{ac}-r{replicate}-w{world}-{param_dtype}")
    model.save_pretrained(out)
    if rank == 0:
        ref.save_pretrained(out + "-hf")
        saved, hf_saved = SafetensorsFile(out).entries, SafetensorsFile(out + "-hf").entries
        assert {k: (e.shape, e.dtype) for k, e in saved.items()} == {k: (e.shape, e.dtype) for k, e in hf_saved.items()}
        if family != "gpt_oss":  # per-expert keys on disk, as transformers writes them
            assert "model.layers.1.mlp.experts.0.gate_proj.weight" in saved
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        for (name, param), (_, ref_param) in zip(loaded.named_parameters(), ref.named_parameters(), strict=True):
            assert _rel(param.detach(), ref_param.detach()) <= 1e-4, name


def _hf_grads(ckpt: str) -> tuple[float, dict[str, torch.Tensor]]:
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ref.train()
    ids = _batch(dist.get_world_size())
    loss = ref(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {name: param.grad for name, param in ref.named_parameters()}


def _matrix(paths: dict, runs: list) -> None:
    """Loss and every gradient of each run against the single-process HF model on the concatenated batch (1e-4
    relative), the HF reference computed once per checkpoint. A run: (checkpoint, setup config, automoe_options).
    The rows the all-to-all dispatcher sends to each rank are rows_per_destination's."""
    sent = []  # (what the dispatcher sent to each rank, rows_per_destination of its routing)
    original = AllToAllDispatcher.dispatch

    def recording(self, hidden, topk_ids, topk_weights, plan=None):
        dispatched = original(self, hidden, topk_ids, topk_weights, plan)
        sent.append((dispatched.state[3], rows_per_destination(topk_ids, self.num_experts, self.ep_size).tolist()))
        return dispatched

    AllToAllDispatcher.dispatch = recording
    try:
        _check_runs(paths, runs)
    finally:
        AllToAllDispatcher.dispatch = original
    assert sent and all(a == b for a, b in sent)


def _check_runs(paths: dict, runs: list) -> None:
    refs: dict[str, tuple[float, dict]] = {}
    world = dist.get_world_size()
    for ckpt, config, options in runs:
        if ckpt not in refs:
            refs[ckpt] = _hf_grads(paths[ckpt])
        ref_loss, ref_grads = refs[ckpt]
        setup = create_distributed_setup_from_config(config)
        model = AutoMoEForCausalLM.from_pretrained(paths[ckpt], distributed_setup=setup, dtype=torch.float32,
                                                   automoe_options=options)
        blocks = [m for m in model.modules() if hasattr(m, "dispatcher")]
        assert blocks and all(type(b.dispatcher).__name__ == _DISPATCHER[setup.dispatcher] for b in blocks)
        model.train()
        mine = _my_rows(_batch(world))
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        where = f"{ckpt} {config} {options}"
        assert abs(mean.item() / world - ref_loss) <= 1e-5 * abs(ref_loss), where
        for name, param in model.named_parameters():
            assert _rel(_full(param.grad), ref_grads[name]) <= 1e-4, (where, name)


_DISPATCHER = {"local": "LocalDispatcher", "all_to_all": "AllToAllDispatcher"}


def _skewed(paths: dict, ep: int) -> None:
    """Every token of every rank goes to experts 0 and 1, all on ep rank 0: ep rank 1 sends everything and
    receives nothing. The step completes and matches the single-process automoe model with the same router."""
    original = Router.forward

    def forced(self, hidden_states):
        logits, _, _ = original(self, hidden_states)
        ids = torch.tensor([[0, 1]]).expand(logits.shape[0], 2)
        return logits, logits[:, :2].softmax(dim=-1), ids

    ckpt = paths["qwen3_moe"]
    setup = create_distributed_setup_from_config({"ep_size": ep})
    model = AutoMoEForCausalLM.from_pretrained(ckpt, distributed_setup=setup, dtype=torch.float32)
    local = AutoMoEForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    Router.forward = forced  # after building: recognising the router runs it
    try:
        ids = _batch(dist.get_world_size())
        mine = _my_rows(ids)
        model(input_ids=mine, labels=mine).loss.backward()
        local(input_ids=ids, labels=ids).loss.backward()
        for (name, param), (_, ref_param) in zip(model.named_parameters(), local.named_parameters(), strict=True):
            grad = param.grad.full_tensor()
            assert _rel(grad, ref_param.grad) <= 1e-4, name
            if name.endswith("experts.down_proj"):
                assert grad[2:].abs().max() == 0  # experts that got no token
    finally:
        Router.forward = original


def _reads(paths: dict, ep: int) -> None:
    """Count the bytes this rank reads: expert bytes are 1/ep of the files' expert bytes (ep_shard 1 here), all
    bytes 1/world; no rank allocates more than its share of the weights."""
    counts = {"expert": 0, "other": 0}
    original = SafetensorsFile.read

    def counting(self, key, rows=None):
        tensor = original(self, key, rows)
        counts["expert" if ".experts." in key else "other"] += tensor.numel() * tensor.element_size()
        return tensor

    SafetensorsFile.read = counting
    try:
        ckpt = paths["qwen3_moe"]
        setup = create_distributed_setup_from_config({"ep_size": ep})
        model = AutoMoEForCausalLM.from_pretrained(ckpt, distributed_setup=setup, dtype=torch.float32)
    finally:
        SafetensorsFile.read = original
    world = dist.get_world_size()
    entries = SafetensorsFile(ckpt).entries
    sizes = {k: e.row_bytes * (e.shape[0] if e.shape else 1) for k, e in entries.items()}
    expert_bytes = sum(v for k, v in sizes.items() if ".experts." in k)
    total = sum(sizes.values())
    assert counts["expert"] == expert_bytes // ep
    assert counts["expert"] + counts["other"] <= total / world * 1.01
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    assert local <= total / world * 1.01


def _from_config(paths: dict, ep: int) -> None:
    """Random init of each rank's shards: HF's init distribution, no two expert shards alike, trains."""
    config = make_config("qwen3_moe", output_router_logits=False)
    setup = create_distributed_setup_from_config({"ep_size": ep})
    model = AutoMoEForCausalLM.from_config(config, distributed_setup=setup, dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts.gate_up_proj.full_tensor()
    assert abs(experts.std().item() - config.initializer_range) < 0.2 * config.initializer_range
    half = experts.shape[0] // 2
    assert not torch.equal(experts[:half], experts[half:])
    norm = model.model.norm.weight.full_tensor()
    assert torch.equal(norm, torch.ones_like(norm))
    ids = _my_rows(_batch(dist.get_world_size()))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def _bad_setups(paths: dict) -> None:
    world = dist.get_world_size()
    with pytest.raises(ValueError, match="not divisible"):
        create_distributed_setup_from_config({"ep_size": 2 * world})
    with pytest.raises(ValueError, match="not divisible"):
        create_distributed_setup_from_config({"ep_size": world, "dp_replicate_size": 2})
    setup = create_distributed_setup_from_config({"ep_size": world})
    with pytest.raises(ValueError, match="does not divide the model's 7 experts"):
        AutoMoEForCausalLM.from_config(make_config("qwen3_moe", num_experts=7), distributed_setup=setup)
    with pytest.raises(ValueError, match="needs automoe's MoE blocks"):
        AutoMoEForCausalLM.from_pretrained(paths["qwen3_moe"], distributed_setup=setup, automoe_options=False)
    with pytest.raises(ValueError, match="device_map"):
        AutoMoEForCausalLM.from_pretrained(paths["qwen3_moe"], distributed_setup=setup, device_map="cpu")
    model = AutoMoEForCausalLM.from_pretrained(paths["qwen3_moe"], distributed_setup=setup, dtype=torch.float32)
    out = os.path.join(paths["tmp"], "occupied")
    if dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "notes.txt"), "w") as f:
            f.write("the user's")
    dist.barrier()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(out)
    model.save_pretrained(out, overwrite=True)
    assert os.path.exists(os.path.join(out, "notes.txt"))  # overwrite replaces the checkpoint, nothing else


SCENARIOS = {"parity": _parity, "matrix": _matrix, "skewed": _skewed, "reads": _reads, "from_config": _from_config,
             "bad_setups": _bad_setups, "lora": ep_lora_parity}


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ep")
    out = {"tmp": str(root)}
    tied = ("qwen3_moe", {"tie_word_embeddings": True})
    for name, (family, extra) in {"qwen3_moe": ("qwen3_moe", {}), "deepseek_v3": ("deepseek_v3", {}),
                                  "gpt_oss": ("gpt_oss", {}), "qwen3_moe_tied": tied, "mixtral": ("mixtral", {}),
                                  "deepseek_v3_skewed": ("deepseek_v3", {}), "gpt_oss_skewed": ("gpt_oss", {}),
                                  "hunyuan_v1_moe": ("hunyuan_v1_moe", {})}.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config(family, output_router_logits=False, **extra))
        if name.endswith("_skewed"):
            _skew_routers(model)
        out[name] = str(root / name)
        model.save_pretrained(out[name])
    return out


def _skew_routers(model) -> None:
    """Every token of every layer picks experts 0 and 1 (a router bias far above the logits): with ep > 1 the
    other ranks' experts receive no token, expert 0 receives all of them."""
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)  # DeepSeek: chooses, does not weigh
            if bias is None and hasattr(module, "top_k"):
                bias = getattr(module, "bias", None)  # GPT-OSS router bias
            if isinstance(bias, torch.Tensor):
                bias[:2] += 100.0


def test_two_ranks(paths):
    run_ranks(2, [
        ("parity", dict(ep=2)),
        ("parity", dict(ep=1)),
        ("parity", dict(ep=1, ac="full")),
        ("parity", dict(family="gpt_oss", ep=2)),
        ("parity", dict(family="qwen3_moe_tied", ep=2)),
        ("skewed", dict(ep=2)),
        ("reads", dict(ep=2)),
        ("from_config", dict(ep=2)),
        ("bad_setups", {}),
        ("lora", {}),
    ], paths)


FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")
AC_MODES = ("off", "selective", "full")


def _runs(ckpts, ac_modes=AC_MODES, options=None, **config) -> list:
    return [(c, {"ep_size": config.get("ep", 1), "dp_replicate_size": config.get("replicate", 1),
                 "dispatcher": config.get("dispatcher", "auto"), "dispatch_chunks": config.get("chunks", 1),
                 "activation_checkpointing": ac}, options)
            for c in ckpts for ac in ac_modes]


def test_matrix_two_ranks(paths):
    """ep 2 for every family and AC mode, routers skewed to one rank, the composed experts (kernels off, and the
    per-expert loop), the all-to-all dispatcher as a loopback at ep 1 (under FSDP2), and the chunked pipeline."""
    run_ranks(2, [("matrix", dict(runs=(
        _runs(FAMILIES, ep=2)
        + _runs(("deepseek_v3_skewed", "gpt_oss_skewed"), ("off", "full"), ep=2)
        + _runs(("qwen3_moe", "gpt_oss"), ("selective",), {"kernels": "off"}, ep=2)
        + _runs(("gpt_oss_skewed",), ("off",), {"experts_backend": "per_expert"}, ep=2)
        + _runs(("deepseek_v3",), ("full",), ep=1, dispatcher="all_to_all")
        + _runs(("mixtral",), ("off",), ep=1)
        + _runs(("qwen3_moe", "gpt_oss_skewed"), ("full",), ep=2, chunks=2)
    )))], paths)


def test_hf_router_kept_under_ep(paths):
    """HunYuan's gate, which no automoe router rule reproduces, runs as HF's module beside the expert-parallel experts
    (checked on its CPU twin at the meta-device load). Without activation checkpointing: the checkpoint policy keeps
    top-k outputs, which this gate divides in place."""
    run_ranks(2, [("matrix", dict(runs=_runs(("hunyuan_v1_moe",), ("off",), ep=2)))], paths)


def test_matrix_four_ranks(paths):
    """ep 4 and HSDP 2x2 (dp_replicate 2 x ep 2) for every family and AC mode, routers skewed to one rank."""
    run_ranks(4, [("matrix", dict(runs=(
        _runs(FAMILIES, ep=4)
        + _runs(FAMILIES, ep=2, replicate=2)
        + _runs(("deepseek_v3_skewed", "gpt_oss_skewed"), ("selective",), ep=4)
        + _runs(("deepseek_v3_skewed",), ("off",), ep=2, replicate=2, chunks=3)
    )))], paths)


def test_one_rank(paths):
    run_ranks(1, [
        ("parity", dict(ep=1)),
        ("parity", dict(ep=1, ac="selective")),
        ("parity", dict(ep=1, param_dtype="float32")),  # a mixed-precision policy takes FSDP2 even at one rank
    ], paths)


def test_four_ranks(paths):
    run_ranks(4, [
        ("parity", dict(ep=4)),
        ("parity", dict(ep=1, ac="full")),
        ("parity", dict(ep=2, replicate=2)),
        ("reads", dict(ep=4)),
    ], paths)
