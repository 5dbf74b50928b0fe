"""merge stage: build one recipe of conf/merges with mergekit_ops into artifacts/merges/NAME.

The recipe names its inputs (models of conf/models, other recipes); params.yaml maps each name
to the artifact directory DVC tracks for it.

    python -m stages.merge NAME
"""
from __future__ import annotations

import sys
from pathlib import Path

from mergekit_ops import MergeOptions, merge
from mergekit_ops.errors import MergeError
from mergekit_ops.progress import ProgressBar
from mergekit_ops.recipe import parse_recipe

from .cli import run_stage


def build(name: str, params: dict, progress: bool = False) -> Path:
    spec = params["merges"][name]
    recipe = parse_recipe(spec["recipe"], f"conf/merges/{name}.yaml")
    recipe.rename_models(spec["inputs"])
    out = Path(params["artifacts"]) / "merges" / name
    bar = ProgressBar() if progress else None
    try:
        return merge(recipe, out, MergeOptions(seed=spec["seed"], progress=bar))
    finally:
        if bar:
            bar.close()


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "stages.merge", "merges", "recipe",
                     lambda name, params: f"merged {name} into {build(name, params, sys.stderr.isatty())}",
                     (MergeError,))


if __name__ == "__main__":
    sys.exit(main())
