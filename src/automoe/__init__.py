"""automoe: fast Mixture-of-Experts fine-tuning for Hugging Face Transformers v5, by changing one import."""

from .auto_model import AutoMoEForCausalLM
from .optimize import AutoMoEWarning, optimize_model
from .options import AutoMoEOptions

__all__ = ["AutoMoEForCausalLM", "AutoMoEOptions", "AutoMoEWarning", "optimize_model"]
__version__ = "0.1.0"
