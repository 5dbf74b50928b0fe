"""mergekit_ops: merge safetensors checkpoints from mergekit-compatible recipes.

    from mergekit_ops import merge, MergeOptions
    merge("recipe.yml", "out/", MergeOptions(seed=0))

Attributes load lazily so that `python -m mergekit_ops --help` does not pay for importing torch.
"""
from __future__ import annotations

__all__ = ["merge", "merge_file", "MergeOptions", "load_recipes", "MergeError", "RecipeError", "CheckpointError"]

_EXPORTS = {
    "merge": "engine", "merge_file": "engine", "MergeOptions": "engine", "load_recipes": "recipe",
    "MergeError": "errors", "RecipeError": "errors", "CheckpointError": "errors",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'mergekit_ops' has no attribute '{name}'")
