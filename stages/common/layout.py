"""Where every artifact of a project lies, and what params.yaml says a merge is made from.

Every stage, and compose when it writes dvc.yaml, asks this module: no other code spells an
artifact path, so the graph DVC checks and the files the stages write cannot drift apart.

    artifacts/models/NAME            a hub model, fetched, or a model with its LoRA adapter merged in
                                     (a local model without one is read where it lies)
    artifacts/merges/NAME            a merge
    artifacts/eval/NAME.json         a model's or merge's metrics on the test split
    artifacts/eval/NAME.validation.json            ... and on the validation split
    artifacts/reports/NAME/          a merge's report (report.md, retention.json, scores.json and
                                     their pictures scores.png, retention.png) or a sweep's curve
                                     (sweep.md, sweep.json, sweep.png)
    artifacts/publish/TARGET/        a publish target's staged repo and receipt
    artifacts/searches/NAME/         a search's best recipe, its trials (and trials.png), its best trial
    artifacts/exports/NAME/          an export: model.gguf, Modelfile, lmstudio/ (gguf), or a LoRA adapter
"""
from __future__ import annotations

from pathlib import Path

def _root(params: dict) -> Path:
    return Path(params["artifacts"])


def model_dir(name: str, params: dict) -> Path:
    """A local source in place; a hub model, or one with an adapter, from its fetch stage; a merge
    from its merge stage."""
    model = params["models"].get(name)
    if model is None:
        return merge_dir(name, params)
    return _root(params) / "models" / name if fetched(model) else Path(model["path"])


def fetched(model: dict) -> bool:
    """Whether a source model is made by a fetch stage: from the hub, or with an adapter applied."""
    return model["source"] == "hub" or bool(model.get("adapter"))


def merge_dir(name: str, params: dict) -> Path:
    return _root(params) / "merges" / name


def export_dir(name: str, params: dict) -> Path:
    return _root(params) / "exports" / name


def metrics_file(name: str, params: dict, split: str = "test") -> Path:
    """A model's scores on the test split (what reports, gates and cards read), or on another."""
    return _root(params) / "eval" / (f"{name}.json" if split == "test" else f"{name}.{split}.json")


def report_dir(name: str, params: dict) -> Path:
    """A merge's report, or a sweep's curve (recipe and sweep names share conf/merges, so never clash)."""
    return _root(params) / "reports" / name


def report_files(name: str, params: dict) -> dict[str, Path]:
    """A merge's report: the table, its retention metrics (DVC metrics), its scores (DVC plots) and
    the pictures of both (PNG: what report.md and the model card show)."""
    folder = report_dir(name, params)
    return {"table": folder / "report.md", "retention": folder / "retention.json", "scores": folder / "scores.json",
            "scores_png": folder / "scores.png", "retention_png": folder / "retention.png"}


def sweep_files(name: str, params: dict) -> dict[str, Path]:
    """A sweep's curve: the table, the rows DVC plots draws, and their picture."""
    folder = report_dir(name, params)
    return {"table": folder / "sweep.md", "curve": folder / "sweep.json", "curve_png": folder / "sweep.png"}


def search_files(name: str, params: dict) -> dict[str, Path]:
    """A search's outputs: the best recipe (mergekit YAML), the trials (DVC plots) and their picture,
    the best trial (DVC metrics)."""
    folder = _root(params) / "searches" / name
    return {"recipe": folder / "recipe.yaml", "trials": folder / "trials.json", "trials_png": folder / "trials.png",
            "best": folder / "best.json"}


def card_images(name: str, params: dict) -> dict[str, Path]:
    """{path in the hub repo: the picture it is copied from} for the model card of merge `name`: its
    report's scores and retention, and for a merge a search found, the search's trials. The publish
    stage copies them and declares them as its dependencies (compose asks here too)."""
    report = report_files(name, params)
    images = {"images/scores.png": report["scores_png"], "images/retention.png": report["retention_png"]}
    search = params["merges"][name].get("search")
    return images | ({"images/trials.png": search_files(search, params)["trials_png"]} if search else {})


def publish_dir(target: str, params: dict) -> Path:
    return _root(params) / "publish" / target


def parents(name: str, params: dict) -> list[str]:
    """A merge's inputs, sorted by name ([] for a source model)."""
    return list(params["merges"][name]["inputs"]) if name in params["merges"] else []


def ancestors(name: str, params: dict) -> list[str]:
    """Every model and merge a model is made from, at any depth, each once, nearest first."""
    found: list[str] = []
    todo = parents(name, params)
    while todo:
        ref = todo.pop(0)
        if ref not in found:
            found.append(ref)
            todo += parents(ref, params)
    return found


def roles(name: str, params: dict) -> list[tuple[str, str]]:
    """What a merge's report and card compare: ("merge", name), ("parent", p) for each input that
    is not its base, then ("base", its base) when it has one."""
    base = base_of(name, params)
    return ([("merge", name)] + [("parent", p) for p in parents(name, params) if p != base]
            + ([("base", base)] if base else []))


def base_of(name: str, params: dict) -> str | None:
    """The model a merge is compared with: its recipe's (or search's) base_model, else the one base its merge
    parents share, else the project's `evaluate.baseline`."""
    spec = params["merges"][name]
    base = spec["recipe"].get("base_model") if "recipe" in spec else spec.get("base_model")  # a search's is fixed
    if base:
        return base
    bases = {base_of(p, params) for p in parents(name, params) if p in params["merges"]}
    if len(bases) == 1 and None not in bases:
        return bases.pop()
    return params.get("evaluate", {}).get("baseline")
