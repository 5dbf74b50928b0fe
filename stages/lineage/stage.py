"""The lineage tree of an artifact, read back from MLflow: a merge, the merges it was made from,
down to the source models (hub repo and commit, or local path) with their content digests.

    python -m stages.lineage NAME      (run in the project; MLFLOW_TRACKING_URI overrides the store)

When the artifact is on disk, the record of exactly those bytes is shown; otherwise the newest
record of that name.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ..common import tracking
from ..common.digest import directory_digest
from ..common.errors import LineageError
from ..common.layout import model_dir

TAG = tracking.TAG


def record_of(name: str, params: dict | None):
    """The LoggedModel of the artifact as built now (or the newest of that name)."""
    digest = None
    if params and (name in params.get("models", {}) or name in params.get("merges", {})):
        path = model_dir(name, params)
        digest = directory_digest(path) if path.is_dir() else None
    model = tracking.find(name, digest)
    if model is None:
        state = f"with digest {digest}" if digest else "at all"
        raise LineageError(f"MLflow at {tracking.shown_uri(tracking.tracking_uri())} has no record of '{name}' "
                           f"{state}: run `dvc repro` (its merge or eval stage records it)")
    return model


def describe(model, with_id: bool = True) -> str:
    """One line: name, how it was made, digest; and MLflow's model id (random per store, so a model
    card leaves it out to stay the same on every machine)."""
    tags = model.tags
    digest = tags.get(f"{TAG}digest", "?")[:19]
    if f"{TAG}search" in tags:
        found = f"found by search {tags[f'{TAG}search']}, trial {tags.get(f'{TAG}trial')}"
        what = f"merge ({tags[f'{TAG}method']}, {found})"
    elif f"{TAG}method" in tags:
        what = f"merge ({tags[f'{TAG}method']})"
    elif tags.get(f"{TAG}source") == "hub":
        what = f"hub {tags.get(f'{TAG}repo_id')} @ {tags.get(f'{TAG}sha', '?')}"
    else:
        what = f"local {tags.get(f'{TAG}path')}"
    return f"{model.name}  {what}  {digest}" + (f"  [{model.model_id}]" if with_id else "")


def parents_of(model) -> list:
    """The models the run that built this one took as inputs, in recipe order (none for sources)."""
    import mlflow

    if not model.source_run_id:
        return []
    with tracking.mlflow_errors(f"cannot read the run that built '{model.name}'"):
        run = mlflow.get_run(model.source_run_id)
        found = [mlflow.get_logged_model(i.model_id) for i in (run.inputs.model_inputs or [])]
    order = run.data.tags.get(f"{TAG}inputs", "").split(",")
    return sorted(found, key=lambda m: order.index(m.name) if m.name in order else len(order))


def tree(model, with_id: bool = True, prefix: str = "", last: bool = True, root: bool = True) -> list[str]:
    line = describe(model, with_id)
    lines = [line if root else prefix + ("└── " if last else "├── ") + line]
    children = parents_of(model)
    inner = "" if root else prefix + ("    " if last else "│   ")
    for i, child in enumerate(children):
        lines += tree(child, with_id, inner, i == len(children) - 1, root=False)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.lineage", description=__doc__.split("\n\n")[0])
    p.add_argument("name", metavar="NAME", help="a model (conf/models) or merge (conf/merges) by name; the store "
                   "is MLFLOW_TRACKING_URI when set, else mlflow.db in the current directory")
    name = p.parse_args(argv).name
    params = yaml.safe_load(Path("params.yaml").read_text()) if Path("params.yaml").is_file() else None
    try:
        tracking.connect(create=False)
        print("\n".join(tree(record_of(name, params))))
    except LineageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
