"""The lineage tree of an artifact, read back from MLflow: a merge, the merges it was made from,
down to the source models (hub repo and commit, or local path) with their content digests.

    python -m stages.lineage NAME      (run in the project; MLFLOW_TRACKING_URI overrides the store)
    python -m stages.lineage --sync    (record every current build that the store lacks: sync.py)

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
from ..common.store import shown_uri

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
        raise LineageError(f"MLflow at {shown_uri(tracking.tracking_uri())} has no record of '{name}' "
                           f"{state}: run `dvc repro`, or `mergeforge lineage --sync` where the build is done")
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
        what = f"local {tags.get(f'{TAG}base_path', tags.get(f'{TAG}path'))}"
    if f"{TAG}adapter.source" in tags:
        what += f" + adapter {tags.get(f'{TAG}adapter.repo_id') or tags.get(f'{TAG}adapter.path')}"
    return f"{tags.get(f'{TAG}name', model.name)}  {what}  {digest}" + (f"  [{model.model_id}]" if with_id else "")


def parents_of(model) -> list:
    """The models this one was merged from, in recipe order (none for sources): each parent's
    model id is in its tag mergeforge.parent.NAME ("<digest> <model id>")."""
    import mlflow

    names = [n for n in model.tags.get(f"{TAG}inputs", "").split(",") if n]
    with tracking.mlflow_errors(f"cannot read the parents of '{model.name}'"):
        return [mlflow.get_logged_model(model.tags[f"{TAG}parent.{n}"].split()[-1]) for n in names]


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
    p.add_argument("name", metavar="NAME", nargs="?", help="a model (conf/models) or merge (conf/merges) by name; "
                   "the store is MLFLOW_TRACKING_URI when set, else mlflow.db in the current directory")
    p.add_argument("--sync", action="store_true", help="record every current build (models, merges, metrics, "
                   "registry aliases) the store lacks, from params.yaml and the files (builds `dvc status` "
                   "finds out of date are left out); `dvc repro` does this in its last stage")
    args = p.parse_args(argv)
    if args.sync == bool(args.name):
        p.error("give NAME, or --sync")
    params = yaml.safe_load(Path("params.yaml").read_text()) if Path("params.yaml").is_file() else None
    try:
        if args.sync:
            if params is None:
                raise LineageError("no params.yaml here: run in a project's root")
            from .sync import run

            return run(params)
        tracking.connect(create=False)
        print("\n".join(tree(record_of(args.name, params))))
    except LineageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
