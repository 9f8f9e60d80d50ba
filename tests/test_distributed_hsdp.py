"""HSDP (dp_replicate_size 2) on CPU with gloo: random init gives every replica the same shards, and training
matches one process that trains the same full weights on the concatenated batch.

The ranks are seeded differently before building (as ranks often are), so equal replicas cannot come from equal
user seeds. Spawning and the batch split are test_distributed_ep's.
"""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed_ep import _batch, _free_port, _full, _my_rows, _rel
from tiny_configs import make_config
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from automoe import AutoMoEForCausalLM, create_distributed_setup_from_config

STEPS = 3


def _entry(rank: int, world: int, port: int, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _replicas_train_as_one(**kwargs)
    except Exception as err:
        raise AssertionError(f"rank {rank}, {kwargs}: {err}\n{traceback.format_exc()}") from err
    finally:
        dist.destroy_process_group()


def _assert_replicas_equal(model, group) -> None:
    size = dist.get_world_size(group)
    for name, param in model.named_parameters():
        local = (param.to_local() if isinstance(param, DTensor) else param).detach().contiguous()
        gathered = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(gathered, local, group=group)
        for other in gathered[1:]:
            assert torch.equal(other, gathered[0]), f"{name}: replicas hold different shards"


def _replicas_train_as_one(family: str, ep: int) -> None:
    world = dist.get_world_size()
    config = make_config(family, output_router_logits=False)
    setup = create_distributed_setup_from_config({"ep_size": ep, "dp_replicate_size": 2})
    torch.manual_seed(100 + dist.get_rank())
    model = AutoMoEForCausalLM.from_config(config, distributed_setup=setup, dtype=torch.float32)
    replicas = setup.mesh["dp_replicate"].get_group()
    _assert_replicas_equal(model, replicas)
    full = {name: _full(param).detach().clone() for name, param in model.named_parameters()}
    experts = full["model.layers.0.mlp.experts.gate_up_proj"]
    half = experts.shape[0] // 2
    assert not torch.equal(experts[:half], experts[half:])  # shards are not copies of one another
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = ref.load_state_dict(full, strict=False)
    assert not unexpected and all(name in dict(ref.named_buffers()) for name in missing), (missing, unexpected)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-3) for m in (model, ref)]
    model.train()
    ref.train()
    for step in range(STEPS):
        ids = (_batch(world) + step) % 128
        mine = _my_rows(ids)
        losses = [model(input_ids=mine, labels=mine).loss, ref(input_ids=ids, labels=ids).loss]
        torch.autograd.backward(losses)
        rank_sum = losses[0].detach().clone()
        dist.all_reduce(rank_sum)
        assert abs(rank_sum.item() / world - losses[1].item()) <= 1e-5 * abs(losses[1].item()), step
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    _assert_replicas_equal(model, replicas)
    for (name, param), (_, ref_param) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert _rel(_full(param).detach(), ref_param.detach()) <= 1e-4, name


def _run(world: int, **kwargs) -> None:
    mp.spawn(_entry, args=(world, _free_port(), kwargs), nprocs=world, join=True)


def test_two_replicas_of_one_rank():
    _run(2, family="qwen3_moe", ep=1)


def test_two_replicas_of_ep2():
    _run(4, family="qwen3_moe", ep=2)
