"""`automoe finetune`: the ready fine-tuning recipe (config, data, loop, checkpoints, export)."""

from .config import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe"]
