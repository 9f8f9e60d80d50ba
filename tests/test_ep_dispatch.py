"""Expert-parallel dispatch in one process: the deduplicated row count, the rows the experts get, the dispatcher
option, and the all-to-all dispatcher as a loopback (ep 1) against the local one."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from tiny_configs import make_config

from automoe import AutoMoEForCausalLM, create_distributed_setup_from_config
from automoe.distributed.dispatch import AllToAllDispatcher, rows_per_destination
from automoe.moe.dispatch import LocalDispatcher, expert_rows


def test_dedup_sends_at_most_070_of_the_copies():
    """Qwen3-30B-A3B's router shape (128 experts, top-8, softmax over a [2048 -> 128] gate) with random weights,
    over ep 8: a token goes once to each rank owning any of its experts instead of once per chosen expert."""
    torch.manual_seed(0)
    num_experts, top_k, ep, tokens = 128, 8, 8, 4096
    gate = torch.randn(num_experts, 2048) * 0.02
    logits = torch.randn(tokens, 2048) @ gate.t()
    ids = logits.softmax(dim=-1).topk(top_k, dim=-1).indices
    per_copy = ids.numel()  # the dispatcher before deduplication sent every (token, expert) copy
    dedup = rows_per_destination(ids, num_experts, ep)
    assert dedup.shape == (ep,) and dedup.dtype == torch.int64
    owners = ids // (num_experts // ep)
    assert int(dedup.sum()) == sum(len(set(row.tolist())) for row in owners)
    ratio = int(dedup.sum()) / per_copy
    print(f"dedup: {int(dedup.sum())} rows sent vs {per_copy} copies: {ratio:.3f}x")
    assert ratio <= 0.70


def test_expert_rows_list_each_tokens_rows():
    """Rows sorted by expert (stable), absent slots dropped, and the CSR of each token's rows, against a loop."""
    torch.manual_seed(0)
    tokens, top_k, experts = 13, 3, 4
    slot_expert = torch.randint(0, experts + 1, (tokens, top_k))  # `experts` marks a slot whose expert is elsewhere
    weights = torch.rand(tokens, top_k)
    num_rows = int((slot_expert < experts).sum())
    rows = expert_rows(slot_expert, weights, experts, num_rows)
    want = sorted(((e, t, j) for t in range(tokens) for j, e in enumerate(slot_expert[t].tolist()) if e < experts))
    assert rows.token_of_row.tolist() == [t for _, t, _ in want]
    assert rows.weights.tolist() == [weights[t, j].item() for _, t, j in want]
    assert rows.row_expert().tolist() == [e for e, _, _ in want]
    assert rows.offsets.tolist() == [sum(1 for e, _, _ in want if e <= x) for x in range(experts)]
    for t in range(tokens):
        mine = rows.token_rows[rows.token_ptr[t] : rows.token_ptr[t + 1]].tolist()
        assert sorted(mine) == [r for r, (_, tt, _) in enumerate(want) if tt == t]


@pytest.mark.parametrize(
    "config, message",
    [({"dispatcher": "nccl"}, "unknown dispatcher 'nccl'"),
     ({"dispatcher": "local", "ep_size": 2}, "dispatcher 'local' keeps every expert on each rank")],
)
def test_bad_dispatcher_is_named(config, message):
    with pytest.raises(ValueError, match=message):
        create_distributed_setup_from_config(config)


@pytest.mark.parametrize("chunks", [1, 3])
def test_loopback_all_to_all_trains_as_the_local_dispatcher(one_rank, monkeypatch, chunks):
    """{"ep_size": 1, "dispatcher": "all_to_all"} at world size 1: every dispatch and combine goes through the EP
    code (counted), and loss and every gradient equal the local model's, also pipelined in chunks."""
    config = make_config("qwen3_moe", output_router_logits=False)
    torch.manual_seed(0)
    local = AutoMoEForCausalLM.from_config(config, dtype=torch.float32)
    setup = create_distributed_setup_from_config({"ep_size": 1, "dispatcher": "all_to_all",
                                                  "dispatch_chunks": chunks})
    assert create_distributed_setup_from_config({"ep_size": 1}).dispatcher == "local"
    loop = AutoMoEForCausalLM.from_config(config, dtype=torch.float32, distributed_setup=setup)
    loop.load_state_dict(local.state_dict())
    blocks = [m for m in loop.modules() if hasattr(m, "dispatcher")]
    assert blocks and all(type(b.dispatcher) is AllToAllDispatcher for b in blocks)
    assert all(type(b.dispatcher) is LocalDispatcher for b in local.modules() if hasattr(b, "dispatcher"))
    calls = []
    original = dist.all_to_all_single
    monkeypatch.setattr(dist, "all_to_all_single", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = torch.randint(3, 128, (2, 12))
    loss = loop(input_ids=ids, labels=ids).loss
    loss.backward()
    ref = local(input_ids=ids, labels=ids).loss
    ref.backward()
    assert len(calls) >= 4 * chunks * len(blocks)  # counts, tokens, ids and weights each way, per chunk and layer
    assert abs(loss.item() - ref.item()) <= 1e-6 * abs(ref.item())
    for (name, p), (_, q) in zip(loop.named_parameters(), local.named_parameters(), strict=True):
        assert ((p.grad - q.grad).norm() / q.grad.norm()).item() <= 1e-5, name


def _counted_step(model, ids, calls: list) -> tuple[int, int, torch.Tensor]:
    """(all-to-alls in forward, all-to-alls in backward, loss)."""
    calls.clear()
    loss = model(input_ids=ids, labels=ids).loss
    forward = len(calls)
    loss.backward()
    return forward, len(calls) - forward, loss.detach()


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_checkpoint_recompute_runs_no_collective(one_rank, monkeypatch, ac):
    """A checkpointed layer's recompute (in backward) reuses what its all-to-alls received: backward runs exactly
    the collectives of the uncheckpointed model (the gradients' way back), none for the recompute."""
    calls = []
    original = dist.all_to_all_single
    monkeypatch.setattr(dist, "all_to_all_single", lambda *a, **k: calls.append(1) or original(*a, **k))
    config = make_config("qwen3_moe", output_router_logits=False)
    ids = torch.randint(3, 128, (2, 12))
    counts, grads = {}, {}
    for mode in ("off", ac):
        torch.manual_seed(0)
        setup = create_distributed_setup_from_config(
            {"ep_size": 1, "dispatcher": "all_to_all", "activation_checkpointing": mode})
        model = AutoMoEForCausalLM.from_config(config, dtype=torch.float32, distributed_setup=setup)
        assert all(layer.gradient_checkpointing == (mode != "off") for layer in model.model.layers)
        *counts[mode], _ = _counted_step(model, ids, calls)
        grads[mode] = [p.grad for p in model.parameters()]
    assert counts[ac] == counts["off"] and counts["off"][0] > 0, counts
    for got, want in zip(grads[ac], grads["off"], strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
