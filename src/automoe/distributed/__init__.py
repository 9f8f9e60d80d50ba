"""Expert parallelism orthogonal to FSDP2: the setup (mesh), the all-to-all dispatcher, and how they are applied."""

from .grad_norm import clip_grad_norm_
from .setup import DistributedSetup, create_distributed_setup_from_config

__all__ = ["DistributedSetup", "clip_grad_norm_", "create_distributed_setup_from_config"]
