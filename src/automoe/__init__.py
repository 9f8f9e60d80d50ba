"""automoe: fast Mixture-of-Experts fine-tuning for Hugging Face Transformers v5, by changing one import."""

from .auto_model import AutoMoEForCausalLM
from .describe import describe
from .distributed import DistributedSetup, create_distributed_setup_from_config
from .optimize import AutoMoEWarning, optimize_model
from .options import AutoMoEOptions

__all__ = [
    "AutoMoEForCausalLM",
    "AutoMoEOptions",
    "AutoMoEWarning",
    "DistributedSetup",
    "create_distributed_setup_from_config",
    "describe",
    "optimize_model",
]
__version__ = "0.1.0"
