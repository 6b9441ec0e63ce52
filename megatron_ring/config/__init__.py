from .recipe import MoELossConfig, ParallelConfig, PrecisionConfig, Recipe, list_recipes, load_recipe

__all__ = ["MoELossConfig", "ParallelConfig", "PrecisionConfig", "Recipe", "list_recipes", "load_recipe"]
