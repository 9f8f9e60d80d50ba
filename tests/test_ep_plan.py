"""The EP dispatcher's bookkeeping kernels (kernels.ep_plan) give the same integers as their torch reference, on
a GPU or through Triton's interpreter (TRITON_INTERPRET=1) on CPU; skipped where neither can run."""

from __future__ import annotations

import pytest
import torch

from automoe.kernels.ep_plan import pair_plan, route_counts
from automoe.kernels.select import interpreting, triton_available

GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not triton_available() or not (GPU or interpreting()),
    reason="needs triton and a GPU (or TRITON_INTERPRET=1 on CPU)",
)
DEVICE = "cuda" if GPU else "cpu"


def _routing(tokens: int, experts: int, k: int, ep: int, seed: int) -> torch.Tensor:
    """Top-k ids, distinct per token; seed 1 sends every token to the first rank's experts only (the other ranks
    receive nothing from here)."""
    g = torch.Generator().manual_seed(seed)
    pool = experts // ep if seed == 1 else experts
    return torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(tokens)]).to(DEVICE)


@pytest.mark.parametrize(("tokens", "experts", "k", "ep", "seed"), [
    (1, 8, 2, 1, 0), (37, 16, 3, 2, 0), (300, 64, 8, 4, 0), (300, 64, 6, 4, 1), (130, 128, 8, 8, 2),
])
def test_triton_plan_equals_torch(tokens, experts, k, ep, seed):
    ids = _routing(tokens, experts, k, ep, seed)
    counts, owns = route_counts(ids, experts, ep, mode="torch")
    t_counts, t_owns = route_counts(ids, experts, ep, mode="triton")
    assert torch.equal(t_counts, counts) and torch.equal(t_owns, owns)
    received = torch.randint(0, tokens + 1, counts.shape, device=DEVICE)
    received[:, :-1] = counts[:, :-1].flip(0)  # any counts will do: those of a mirrored rank
    want = pair_plan(ids, owns, counts, received, mode="torch")
    got = pair_plan(ids, owns, counts, received, mode="triton")
    pairs = int(counts[:, -1].sum())
    assert torch.equal(got.sizes, want.sizes) and torch.equal(got.offsets, want.offsets)
    assert torch.equal(got.token_ptr, want.token_ptr)
    for name in ("send_token", "slot_of_pair", "token_rows"):
        assert torch.equal(getattr(got, name)[:pairs], getattr(want, name)[:pairs]), name
