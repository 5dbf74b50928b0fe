"""merge stage: build one recipe of conf/merges with mergekit_ops into artifacts/merges/NAME.

The recipe names its inputs (models of conf/models, other recipes); params.yaml maps each name
to the artifact directory DVC tracks for it.

    python -m stages.merge NAME
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from mergekit_ops import MergeOptions, merge
from mergekit_ops.errors import MergeError
from mergekit_ops.progress import ProgressBar
from mergekit_ops.recipe import parse_recipe


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
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stages.merge NAME", file=sys.stderr)
        return 2
    params = yaml.safe_load(Path("params.yaml").read_text())
    if args[0] not in params["merges"]:
        print(f"error: no recipe '{args[0]}' in params.yaml (run `dvc repro`, which composes conf/ first)",
              file=sys.stderr)
        return 2
    try:
        out = build(args[0], params, progress=sys.stderr.isatty())
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {args[0]} into {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
