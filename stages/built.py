"""What params.yaml says about built artifacts: where each model or merge lies, what a merge was
made from, and which model it is measured against."""
from __future__ import annotations

from pathlib import Path


def artifact_path(name: str, params: dict) -> Path:
    """A local source in place, a hub model from its fetch stage, a merge from its merge stage."""
    root = Path(params["artifacts"])
    if name in params["merges"]:
        return root / "merges" / name
    model = params["models"][name]
    return Path(model["path"]) if model["source"] == "local" else root / "models" / name


def parents(name: str, params: dict) -> list[str]:
    """A merge's inputs by name, in recipe order ([] for a source model)."""
    return list(params["merges"][name]["inputs"]) if name in params["merges"] else []


def base_of(name: str, params: dict) -> str | None:
    """The model a merge is compared with: its recipe's base_model, else the one base its merge
    parents share, else the project's `evaluate.baseline`."""
    recipe = params["merges"][name]["recipe"]
    if recipe.get("base_model"):
        return recipe["base_model"]
    bases = {base_of(p, params) for p in parents(name, params) if p in params["merges"]}
    if len(bases) == 1 and None not in bases:
        return bases.pop()
    return params.get("evaluate", {}).get("baseline")
