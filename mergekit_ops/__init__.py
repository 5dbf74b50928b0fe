"""mergekit_ops: merge safetensors checkpoints from mergekit-compatible recipes.

    from mergekit_ops import merge, MergeOptions
    merge("recipe.yml", "out/", MergeOptions(seed=0))

Attributes load lazily so that `python -m mergekit_ops --help` does not pay for importing torch.
"""
from __future__ import annotations

_EXPORTS = {  # public name: (module, its name there)
    "merge": ("engine", "merge"), "merge_file": ("engine", "merge_file"),
    "merge_tensors": ("engine", "merge_tensors"), "MergeOptions": ("engine", "MergeOptions"),
    "load_recipes": ("recipe", "load_recipes"), "parse_recipe": ("recipe", "parse_recipe"), "Recipe": ("recipe", "Recipe"),
    "MergeError": ("errors", "MergeError"), "RecipeError": ("errors", "RecipeError"),
    "CheckpointError": ("errors", "CheckpointError"),
    "extract_lora": ("lora_extract", "extract_lora"), "ExtractOptions": ("lora_extract", "ExtractOptions"),
    # what the pipeline (stages/) uses besides merging: checks before a download, progress, safe YAML
    "Checkpoint": ("checkpoint", "Checkpoint"), "is_vocab_tensor": ("vocab", "is_vocab_tensor"),
    "is_device_name": ("devices", "is_device_name"), "progress_bar": ("progress", "progress_bar"),
    "load_yaml_file": ("safe_yaml", "load_file"), "METHODS": ("methods", "METHODS"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'mergekit_ops' has no attribute '{name}'")
