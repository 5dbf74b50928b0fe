"""merge stage: build one recipe of conf/merges (or the one a search of conf/searches found) with
mergekit_ops into artifacts/merges/NAME and record it in MLflow (its parents named on its record).

The recipe names its inputs (models of conf/models, other recipes); params.yaml maps each name
to the artifact directory DVC tracks for it.

    python -m stages.merge NAME
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from mergekit_ops import MergeError, MergeOptions, merge, parse_recipe, progress_bar

from ..common import tracking
from ..common.digest import remember
from ..common.errors import EvalError, LineageError
from ..common.layout import merge_dir, search_files
from ..common.recipes import recipe_of
from ..common.stage_cli import in_section, run_stage


def build(name: str, params: dict, progress: bool = False) -> Path:
    """Merge, then record the merge in MLflow; a merge that cannot be recorded is removed (MLflow is
    opened first, so an unreachable store fails before any work)."""
    spec = params["merges"][name]
    source = f"conf/merges/{name}.yaml" if "recipe" in spec else str(search_files(name, params)["recipe"])
    recipe = parse_recipe(recipe_of(name, params), source)
    recipe.rename_models(spec["inputs"])
    out = merge_dir(name, params)
    tracking.connect()
    sums: dict[str, str] = {}  # the weights' sha256, taken as they are written: the digest need not read them
    with progress_bar(progress) as bar:
        merge(recipe, out, MergeOptions(seed=spec.get("seed", 0), device=spec["device"], progress=bar, sha256=sums))
    try:
        remember(out, sums)
        tracking.ensure(name, params)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "stages.merge", "recipe", in_section("merges"),
                     lambda name, params: f"merged {name} into {build(name, params, sys.stderr.isatty())}",
                     (MergeError, LineageError, EvalError))
