"""create_distributed_setup_from_config: clear errors for each bad setup; checkpointing that never reroutes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from automoe import DistributedSetup, create_distributed_setup_from_config
from automoe.distributed.parallelize import checkpoint_function


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['ep_sise'\]"):
        create_distributed_setup_from_config({"ep_sise": 2})


@pytest.mark.parametrize(
    "config, message",
    [
        ({"strategy": "ddp"}, "unknown strategy 'ddp'"),
        ({"activation_checkpointing": "some"}, "activation_checkpointing='some'"),
        ({"ep_size": 0}, "ep_size must be a positive integer"),
        ({"dp_replicate_size": 1.5}, "dp_replicate_size must be a positive integer"),
        ({"param_dtype": "float33"}, "param_dtype='float33' is not a dtype"),
        ({"reshard_after_forward": "no"}, "reshard_after_forward must be true or false, not 'no'"),
    ],
)
def test_bad_values(config, message):
    with pytest.raises(ValueError, match=message):
        create_distributed_setup_from_config(config)


def test_no_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="no process group.*init_process_group"):
        create_distributed_setup_from_config({"ep_size": 1})


def test_sizes_must_divide_world(one_rank):
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by dp_replicate_size \(1\) x ep_size \(2\)"):
        create_distributed_setup_from_config({"ep_size": 2})
    setup = create_distributed_setup_from_config(
        {"strategy": "fsdp2", "activation_checkpointing": True, "param_dtype": "bf16", "reduce_dtype": torch.float32}
    )
    assert isinstance(setup, DistributedSetup)
    assert setup.activation_checkpointing == "full"
    assert (setup.param_dtype, setup.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert setup.mesh.mesh_dim_names == ("dp_replicate", "ep_shard", "ep")
    with pytest.raises(ValueError, match="ep_size=3 does not divide the model's 8 experts"):
        DistributedSetup(ep_size=3, mesh=setup.mesh).check_num_experts(8)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_never_reroutes(mode):
    """A router whose choice changes on every call (as a nondeterministic kernel might): the recomputation in
    backward must reuse the forward's top-k, or gradients would flow to experts the forward never used."""
    calls = []
    experts = torch.randn(4, 8, 8, requires_grad=True)

    def layer(x):
        calls.append(1)
        scores = x @ torch.eye(8, 4) + 10.0 * len(calls) * torch.arange(4.0).roll(len(calls))
        weights, ids = torch.topk(scores.softmax(-1), 1)
        return (weights[:, :, None] * torch.einsum("th,thk->tk", x, experts[ids[:, 0]])[:, None]).sum()

    x = torch.randn(5, 8)
    checkpoint(layer, x, **{k: v for k, v in checkpoint_function(mode).keywords.items()}).backward()
    used = experts.grad.abs().sum(dim=(1, 2)) > 0
    calls.clear()
    experts.grad = None
    layer(x).backward()
    assert torch.equal(experts.grad.abs().sum(dim=(1, 2)) > 0, used)
    assert int(used.sum()) == 1
