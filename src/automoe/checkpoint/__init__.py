"""HF safetensors checkpoints in and out of sharded models: per-rank slice reads and gathered, per-expert saves."""

from .load import load_sharded_checkpoint
from .save import save_pretrained_distributed

__all__ = ["load_sharded_checkpoint", "save_pretrained_distributed"]
