import warnings

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*must be `None` or an integer within the vocabulary.*")
        yield


@pytest.fixture
def one_rank(tmp_path):
    """A one-rank gloo process group for the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
