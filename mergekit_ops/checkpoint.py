"""Input checkpoints: locate a model directory, list its tensors from headers, read lazily.

mergekit_ops never downloads. A model reference is a local directory, or a hub id that is
already in the local Hugging Face cache (the pipeline's fetch stage, or `hf download`, puts it
there). Pickle weights are refused unless the caller opts in, and then load with
weights_only=True.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .safetensors_io import TensorInfo, read_header

PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def resolve_model_dir(ref: str, base_dir: Path | None = None) -> Path:
    """Map a model reference ('path', 'org/name' or 'org/name@revision') to a local directory."""
    path = Path(os.path.expanduser(ref))
    if not path.is_absolute() and base_dir is not None and (base_dir / path).is_dir():
        path = base_dir / path
    if path.is_dir():
        return path
    repo, _, revision = ref.partition("@")
    revision = revision or "main"
    if repo.count("/") == 1 and not repo.startswith((".", "/")):
        repo_dir = hf_cache_dir() / ("models--" + repo.replace("/", "--"))
        ref_file = repo_dir / "refs" / revision
        sha = ref_file.read_text().strip() if ref_file.is_file() else revision
        snapshot = repo_dir / "snapshots" / sha
        if snapshot.is_dir():
            return snapshot
        raise CheckpointError(
            f"model '{ref}': not a local directory and not in the Hugging Face cache at {repo_dir} "
            f"(revision '{revision}'). mergekit_ops does not download: fetch it first "
            f"(e.g. `hf download {repo}`) or give a local path."
        )
    raise CheckpointError(f"model '{ref}': no such directory")


@dataclass
class Checkpoint:
    """A model directory with its config and the tensors its safetensors headers declare."""

    ref: str
    path: Path
    tensors: dict[str, TensorInfo]
    config: dict = field(default_factory=dict)
    pickle_state: dict[str, torch.Tensor] | None = None

    @classmethod
    def open(cls, ref: str, base_dir: Path | None = None, allow_pickle: bool = False) -> "Checkpoint":
        path = resolve_model_dir(ref, base_dir)
        config = {}
        if (path / "config.json").is_file():
            try:
                config = json.loads((path / "config.json").read_text())
            except ValueError as exc:
                raise CheckpointError(f"model '{ref}': {path / 'config.json'} is not valid JSON: {exc}") from exc
        files = _safetensors_files(path, ref)
        if files:
            tensors: dict[str, TensorInfo] = {}
            for file in files:
                infos, _ = read_header(file)
                tensors.update(infos)
            return cls(ref, path, tensors, config)
        pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if not pickles:
            raise CheckpointError(f"model '{ref}': no .safetensors weights in {path}")
        if not allow_pickle:
            raise CheckpointError(
                f"model '{ref}': only pickle weights ({', '.join(pickles)}) in {path}. Pickle files can run "
                "arbitrary code, so they are refused by default: convert them to safetensors, or opt in "
                "with allow_pickle (--allow-pickle), which loads them with torch.load(weights_only=True)."
            )
        return cls._open_pickle(ref, path, pickles, config)

    @classmethod
    def _open_pickle(cls, ref: str, path: Path, files: list[str], config: dict) -> "Checkpoint":
        state: dict[str, torch.Tensor] = {}
        for name in files:
            if name.endswith(".index.json"):
                continue
            loaded = torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)
            state.update({k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)})
        infos = {
            k: TensorInfo(k, v.dtype, tuple(v.shape), path, 0, v.numel() * v.element_size()) for k, v in state.items()
        }
        return cls(ref, path, infos, config, pickle_state=state)

    def read_pickled(self, name: str) -> torch.Tensor:
        """A private copy of a tensor of an opted-in pickle checkpoint."""
        return self.pickle_state[name].clone()


def _safetensors_files(path: Path, ref: str) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"model '{ref}': {index} has no valid weight_map: {exc}") from exc
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"model '{ref}': shards listed in {index} are missing: {', '.join(missing)}")
        return files
    return sorted(path.glob("*.safetensors"))
