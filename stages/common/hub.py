"""Hugging Face hub access for the fetch stage: pin a revision, read what a repo holds before
downloading its weights, download into the normal HF cache.

Honours HF_HUB_OFFLINE and HF_HUB_CACHE (huggingface_hub reads them at import). A private repo
uses HF_TOKEN through huggingface_hub itself: this module never reads, prints or stores a token.
Only top-level files are downloaded: the safetensors weights the model loads, JSON configs and
tokenizer files; pickle weights never.
"""
from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

from .errors import FetchError

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
SMALL_FILES = ["*.json", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]  # the card: its license
WEIGHT_FILES = ["*.safetensors"]
PICKLE_FILES = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"]


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_repo_dir(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def snapshot_dir(repo_id: str, sha: str) -> Path:
    return cache_repo_dir(repo_id) / "snapshots" / sha


def resolve_revision(repo_id: str, revision: str) -> str:
    """The commit a branch or tag points to now (offline: where the local cache says it points)."""
    if SHA_RE.match(revision):
        return revision
    if offline():
        ref = cache_repo_dir(repo_id) / "refs" / revision
        if ref.is_file():
            return ref.read_text().strip()
        raise FetchError(f"hub model '{repo_id}' revision '{revision}': HF_HUB_OFFLINE is set and the local "
                         f"cache has no such revision ({ref} is missing)")
    from huggingface_hub import HfApi

    sha = _call(f"hub model '{repo_id}' revision '{revision}'", HfApi().model_info, repo_id, revision=revision).sha
    if not sha:
        raise FetchError(f"hub model '{repo_id}' revision '{revision}': the hub returned no commit sha")
    return sha


def repo_files(repo_id: str, sha: str) -> list[str]:
    """Every file of the repo at that commit (offline: the files the cache holds)."""
    if offline():
        snapshot = snapshot_dir(repo_id, sha)
        if not snapshot.is_dir():
            raise FetchError(f"hub model '{repo_id}' @ {sha}: HF_HUB_OFFLINE is set and {snapshot} does not exist")
        return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    from huggingface_hub import HfApi

    return _call(f"hub model '{repo_id}' @ {sha}", HfApi().list_repo_files, repo_id, revision=sha)


def check_weights_are_safetensors(repo_id: str, files: list[str]) -> None:
    top = [f for f in files if "/" not in f]
    if any(fnmatch.fnmatch(f, p) for f in top for p in WEIGHT_FILES):
        return
    pickles = [f for f in top if any(fnmatch.fnmatch(f, p) for p in PICKLE_FILES)]
    if pickles:
        raise FetchError(f"hub model '{repo_id}' has only pickle weights ({', '.join(pickles)}); pickle files can run "
                         "arbitrary code, so mergeforge does not download them. Use a revision with safetensors "
                         "weights (many repos have a `refs/pr/N` conversion) or convert them yourself.")
    raise FetchError(f"hub model '{repo_id}' has no .safetensors weights at its top level")


def download(repo_id: str, sha: str, patterns: list[str]) -> Path:
    """Files matching `patterns` at that commit, in the HF cache; returns the snapshot directory."""
    from huggingface_hub import snapshot_download

    return Path(_call(f"hub model '{repo_id}' @ {sha}", snapshot_download, repo_id, revision=sha,
                      allow_patterns=patterns, ignore_patterns=["*/*"]))  # top level only


def weight_files(snapshot: Path) -> list[str]:
    """The safetensors files the model loads: its index's shards, else every top-level one (a repo
    may also ship others, e.g. a `consolidated.safetensors` copy, that nothing reads)."""
    index = snapshot / "model.safetensors.index.json"
    if not index.is_file():
        return WEIGHT_FILES
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise FetchError(f"{index}: no weight_map of tensor name -> file name")
    files = sorted(set(weight_map.values()))
    outside = [f for f in files if "/" in f or "\\" in f or f in ("", ".", "..")]
    if outside:  # only top-level files are fetched, and a merge reads nothing outside its model
        raise FetchError(f"{index}: weight_map names '{outside[0]}', not a file at the top of the repo; "
                         "refused before downloading any weights")
    return files


def remote_headers(repo_id: str, sha: str) -> dict[str, tuple[str, list[int]]]:
    """{tensor: (safetensors dtype, shape)} from the hub's safetensors headers (range requests: no
    weights are downloaded)."""
    if offline():
        raise FetchError(f"hub model '{repo_id}' @ {sha}: HF_HUB_OFFLINE is set and the local cache has no "
                         "safetensors weights for this commit")
    from huggingface_hub import HfApi

    meta = _call(f"hub model '{repo_id}' @ {sha}", HfApi().get_safetensors_metadata, repo_id, revision=sha)
    return {name: (t.dtype, list(t.shape)) for f in meta.files_metadata.values() for name, t in f.tensors.items()}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FetchError(f"{path}: {exc}") from exc


def _call(what: str, fn, *args, **kwargs):
    """One hub call; any failure (network, auth, missing repo) becomes a FetchError naming the repo."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # huggingface_hub and its HTTP client raise many unrelated types
        hint = "" if offline() else " (no network? set HF_HUB_OFFLINE=1 to use the local cache only)"
        raise FetchError(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{hint}") from None
