"""fetch stage: put one hub model into artifacts/models/NAME (local models need no fetch: merges
read them in place).

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
from ..common.layout import model_dir
from ..common.stage_cli import in_section, run_stage
from .preflight import check_model, hub_meta


def fetch(name: str, params: dict) -> Path:
    spec = params["models"][name]
    out = model_dir(name, params)
    repo, sha = spec["repo_id"], spec["sha"]
    hub.check_weights_are_safetensors(repo, hub.repo_files(repo, sha))
    check_model(name, hub_meta(name, repo, sha), params)  # leaves config and index in the snapshot
    print(f"fetch {name}: {repo} @ {sha} (revision {spec['revision']})", file=sys.stderr)
    wanted = hub.SMALL_FILES + hub.weight_files(hub.snapshot_dir(repo, sha))
    link_tree(hub.download(repo, sha, wanted), out, wanted)
    return out


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
    return run_stage(argv, "stages.fetch", "hub model", in_section("models", lambda spec: spec["source"] == "hub"),
                     lambda name, params: f"fetched {name} into {fetch(name, params)}", (FetchError, MergeError))
