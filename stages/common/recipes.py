"""A merge's recipe as mergekit reads it: from params.yaml, or, for a merge a search found, from
the recipe file its search stage wrote (artifacts/searches/NAME/recipe.yaml)."""
from __future__ import annotations

import json

import yaml

from .errors import EvalError
from .layout import search_files

# mergekit's own order of a recipe's keys (its MergeConfiguration), so a recipe reads as mergekit writes it
RECIPE_ORDER = ("merge_method", "slices", "models", "modules", "parameters", "base_model", "dtype",
                "tokenizer_source", "tokenizer", "chat_template", "out_dtype")


def mergekit_body(body: dict) -> dict:
    """The recipe as mergekit reads it, in mergekit's key order: without our own keys and unset options."""
    return {k: body[k] for k in RECIPE_ORDER if body.get(k) is not None}


def recipe_of(name: str, params: dict) -> dict:
    """The recipe merge `name` is built from."""
    spec = params["merges"][name]
    if "recipe" in spec:
        return spec["recipe"]
    path = search_files(spec["search"], params)["recipe"]
    try:
        recipe = yaml.safe_load(path.read_text())  # written by the search stage, not by hand
    except (OSError, yaml.YAMLError) as exc:
        raise EvalError(f"{path}: the recipe search '{spec['search']}' found is missing or unreadable ({exc}); "
                        f"its stage search-{spec['search']} writes it") from None
    if not isinstance(recipe, dict):
        raise EvalError(f"{path}: a recipe (a mapping) expected")
    return recipe


def search_origin(name: str, params: dict) -> dict | None:
    """For a merge a search found: {search, trial, trials, objective, study} from the search's
    best.json; None for a recipe of conf/merges."""
    spec = params["merges"][name]
    if "search" not in spec:
        return None
    path = search_files(spec["search"], params)["best"]
    try:
        best = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvalError(f"{path}: the best trial of search '{spec['search']}' is missing or unreadable ({exc}); "
                        f"its stage search-{spec['search']} writes it") from None
    return {"search": spec["search"]} | {k: best[k] for k in ("trial", "trials", "objective", "study")}
