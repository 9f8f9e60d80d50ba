"""automoe: fast Mixture-of-Experts fine-tuning for Hugging Face Transformers v5, by changing one import."""

from .auto_model import AutoMoEForCausalLM
from .distributed import DistributedSetup, create_distributed_setup_from_config
from .kernels import attention as _attention
from .optimize import AutoMoEWarning, optimize_model
from .options import AutoMoEOptions

# the attention name an automoe model's config carries is known wherever automoe is imported (as by torch.load
# of a pickled model, in a process that never built one); it only adds new names to transformers' registries
_attention.register()

__all__ = [
    "AutoMoEForCausalLM",
    "AutoMoEOptions",
    "AutoMoEWarning",
    "DistributedSetup",
    "create_distributed_setup_from_config",
    "optimize_model",
]
__version__ = "0.1.0"
