"""Expert-parallel correctness on real GPUs (NCCL): a few layers of the Qwen3-30B-A3B shape, bf16.

Run on N GPUs:  torchrun --nproc_per_node N benchmarks/ep_correctness.py --out $OUT/ep_correctness.json
For ep_size in 1, 2 and N (those that divide N), with the default dispatcher and then the all-to-all one in 2
pipelined chunks (at ep 1 a loopback; on one GPU this checks the side-stream pipeline): every rank loads the
same checkpoint (written once by rank 0) with `distributed_setup`, takes its own tokens, and runs forward +
backward. Rank 0 compares the mean loss and a
sample of full gradients with a world-size-1 drop-in model fed the concatenated batch. bf16 tolerances: loss
relative error < 1e-2; gradients relative error reported (bf16 accumulation order differs between the two).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import Qwen3MoeConfig

from automoe import AutoMoEForCausalLM, create_distributed_setup_from_config
from automoe.bench.workload import QWEN3_30B_A3B
from automoe.numerics import relative_error as rel

TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48, vocab_size=128,
            tie_word_embeddings=False, norm_topk_prob=True, max_position_embeddings=128)
SAMPLED = ("layers.0.mlp.experts.gate_up_proj", "layers.1.mlp.experts.down_proj", "layers.0.mlp.gate.weight",
           "layers.1.self_attn.q_proj.weight", "embed_tokens.weight")


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def sampled_grads(model) -> dict[str, torch.Tensor]:
    """Full gradients of the sampled parameters (collectives: every rank calls this)."""
    return {n: full(p.grad).cpu() for n, p in model.named_parameters() if n.endswith(SAMPLED)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU with a tiny model: a dry run of this script")
    args = parser.parse_args()
    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        config = Qwen3MoeConfig(num_hidden_layers=args.layers, **TINY)
    else:
        device, dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), torch.bfloat16
        torch.cuda.set_device(device)
        config = Qwen3MoeConfig(**{**QWEN3_30B_A3B, "num_hidden_layers": args.layers})
    gen = torch.Generator().manual_seed(1234)
    batch = torch.randint(0, config.vocab_size, (world, args.seq), generator=gen)

    path = [tempfile.mkdtemp(prefix="ep_check_") if rank == 0 else None]
    dist.broadcast_object_list(path)
    path = path[0]
    reference = {}
    if rank == 0:
        torch.manual_seed(0)
        model = AutoMoEForCausalLM.from_config(config, dtype=dtype).to(device)
        model.save_pretrained(path)
        model.train()
        loss = model(input_ids=batch.to(device), labels=batch.to(device)).loss
        loss.backward()
        reference = {"loss": loss.item(), "grads": sampled_grads(model)}
        del model, loss
    dist.barrier()

    results = []
    sizes = sorted({e for e in (1, 2, world) if world % e == 0})
    # each ep size with the default dispatcher, then through the all-to-all pipelined in 2 chunks (at ep 1 a
    # loopback: on one GPU this checks the side-stream pipeline)
    configs = [{"ep_size": ep} for ep in sizes] + [
        {"ep_size": ep, "dispatcher": "all_to_all", "dispatch_chunks": 2} for ep in sizes]
    for config in configs:
        setup = create_distributed_setup_from_config(config)
        model = AutoMoEForCausalLM.from_pretrained(path, dtype=dtype, distributed_setup=setup)
        model.train()
        ids = batch[rank : rank + 1].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
        grads = sampled_grads(model)
        if rank == 0:
            row = {"world": world, **config, "loss": mean_loss.item(), "loss_ref": reference["loss"],
                   "loss_rel_err": abs(mean_loss.item() - reference["loss"]) / abs(reference["loss"]),
                   "grad_rel_err": {n: rel(g, reference["grads"][n]) for n, g in grads.items()}}
            row["pass"] = row["loss_rel_err"] < 1e-2 and max(row["grad_rel_err"].values()) < 5e-2
            results.append(row)
            print(json.dumps(row), flush=True)
        del model, loss
        dist.barrier()
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            name = "cpu" if args.cpu else torch.cuda.get_device_name()
            json.dump({"device": name, "results": results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
