"""fetch stage: put one hub model, or a model with its LoRA adapter merged in, into
artifacts/models/NAME (other local models need no fetch: merges read them in place).

Hub models: the pinned commit's configs and tokenizer first, then the checks of every recipe that
reads the model (preflight.py), and only then the safetensors weights, into the normal HF cache.
The output directory holds hard links to the cached files: no second copy of the weights. DVC's cache links them too (and, as DVC does, makes them read-only).

    python -m stages.fetch NAME
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import sys
from pathlib import Path

from mergekit_ops import MergeError

from ..common import hub
from ..common.atomic import fresh_temp
from ..common.errors import FetchError
from ..common.layout import fetched, model_dir
from ..common.stage_cli import in_section, run_stage
from .preflight import check_model, hub_meta

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md"]


def fetch(name: str, params: dict) -> Path:
    spec = params["models"][name]
    out = model_dir(name, params)
    if spec.get("adapter"):
        return with_adapter(name, spec, out)
    repo, sha = spec["repo_id"], spec["sha"]
    hub.check_weights_are_safetensors(repo, hub.repo_files(repo, sha))
    check_model(name, hub_meta(name, repo, sha), params)  # leaves config and index in the snapshot
    print(f"fetch {name}: {repo} @ {sha} (revision {spec['revision']})", file=sys.stderr)
    wanted = hub.SMALL_FILES + hub.weight_files(hub.snapshot_dir(repo, sha))
    link_tree(hub.download(repo, sha, wanted), out, wanted)
    return out


def with_adapter(name: str, spec: dict, out: Path) -> Path:
    """The model's checkpoint with its LoRA adapter merged in, tensor by tensor (mergekit_ops'
    `base+adapter` input), written to `out` as a plain model folder that every stage can read."""
    from mergekit_ops import MergeOptions, merge, parse_recipe, progress_bar

    if spec["source"] == "hub":  # pickle-only weights are refused before anything is downloaded
        hub.check_weights_are_safetensors(spec["repo_id"], hub.repo_files(spec["repo_id"], spec["sha"]))
    base, adapter = (_located(f"model '{name}'", spec, hub.SMALL_FILES + hub.WEIGHT_FILES),
                     _located(f"adapter of model '{name}'", spec["adapter"], ADAPTER_FILES))
    print(f"fetch {name}: {base} with adapter {adapter}", file=sys.stderr)
    recipe = parse_recipe({"merge_method": "passthrough", "models": [{"model": f"{base}+{adapter}"}]},
                          f"model '{name}'")
    with progress_bar(sys.stderr.isatty()) as bar:
        return merge(recipe, out, MergeOptions(progress=bar))


def _located(what: str, source: dict, patterns: list[str]) -> Path:
    """A local folder where it lies, a hub one downloaded (into the HF cache) at its pinned commit."""
    if source["source"] == "local":
        return Path(source["path"]).absolute()
    repo, sha = source["repo_id"], source["sha"]
    print(f"fetch {what}: {repo} @ {sha} (revision {source['revision']})", file=sys.stderr)
    return hub.download(repo, sha, patterns)


def link_tree(src: Path, out: Path, patterns: list[str]) -> None:
    """Hard-link the top-level files of a snapshot that match `patterns` into out, atomically;
    copy across filesystems."""
    files = sorted(p for p in src.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, k) for k in patterns))
    tmp = fresh_temp(out)
    tmp.mkdir(parents=True)
    for f in files:
        real = f.resolve()  # HF cache entries are symlinks to blobs
        try:
            os.link(real, tmp / f.name)
        except OSError:
            shutil.copyfile(real, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "stages.fetch", "hub model", in_section("models", fetched),
                     lambda name, params: f"fetched {name} into {fetch(name, params)}", (FetchError, MergeError))
