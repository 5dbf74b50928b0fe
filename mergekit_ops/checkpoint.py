"""Input checkpoints: locate a model directory, list its tensors from headers, read lazily.

mergekit_ops never downloads. A model reference is a local directory, or a hub id that is
already in the local Hugging Face cache (the pipeline's fetch stage, or `hf download`, puts it
there). Pickle weights are refused unless the caller opts in, and then load with
weights_only=True.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import torch

from .errors import CheckpointError
from .safetensors_io import TensorInfo, open_regular, read_header

if TYPE_CHECKING:
    from .lora import Adapter

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
    adapter: "Adapter | None" = None  # a `model+adapter` reference: the LoRA merged in as tensors are read

    @classmethod
    def open(cls, ref: str, base_dir: Path | None = None, allow_pickle: bool = False) -> "Checkpoint":
        from .lora import Adapter, split_ref  # lora.py reads adapter folders with this module's helpers

        lora = split_ref(ref, base_dir)
        if lora is not None:
            ckpt = cls.open(lora[0], base_dir, allow_pickle)
            ckpt.adapter = Adapter.open(lora[1], base_dir)
            ckpt.adapter.check(ckpt.tensors, lora[0])
            ckpt.ref = ref
            return ckpt
        path = resolve_model_dir(ref, base_dir)
        config = read_json(path, "config.json", ref, dict) or {}
        files = _safetensors_files(path, ref)
        if files:
            tensors: dict[str, TensorInfo] = {}
            for file in files:
                infos, _ = read_header(file)
                twice = next((n for n in infos if n in tensors), None)
                if twice is not None:
                    raise CheckpointError(f"model '{ref}': tensor '{twice}' is defined in both "
                                          f"{tensors[twice].path} and {file}")
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
            file = model_file(path, name, ref)
            try:  # mapped where the format allows: the legacy (pre-zip) format cannot be
                loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
            except pickle.UnpicklingError:  # torch's own message suggests weights_only=False: never
                raise CheckpointError(f"model '{ref}': {file} holds objects other than tensors, which "
                                      "torch.load(weights_only=True) refuses to build (code it would run?)") from None
            except Exception as exc:  # a broken file: RuntimeError, EOFError, ValueError...
                first = (str(exc).strip().splitlines() or [""])[0]
                raise CheckpointError(f"model '{ref}': {file}: torch.load(weights_only=True) cannot load it: "
                                      f"{type(exc).__name__}: {first}") from None
            if not isinstance(loaded, dict):
                raise CheckpointError(f"model '{ref}': {file} holds a {type(loaded).__name__}, not a state dict")
            state.update({k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)})
        infos = {
            k: TensorInfo(k, v.dtype, tuple(v.shape), path, 0, v.numel() * v.element_size()) for k, v in state.items()
        }
        return cls(ref, path, infos, config, pickle_state=state)

    def read_pickled(self, name: str) -> torch.Tensor:
        """A private copy of a tensor of an opted-in pickle checkpoint."""
        return self.pickle_state[name].clone()

    def file(self, name: str) -> Path | None:
        """The model directory's file of that name (config, tokenizer...), None if it has none."""
        return model_file(self.path, name, self.ref)


def model_file(model_dir: Path, name: str, ref: str) -> Path | None:
    """model_dir/name if it exists, else None; an error if it is not a regular file or, followed
    through symlinks, lies outside the model directory. Symlinks into a Hugging Face cache's
    blobs/ (how the cache and `hf download` lay out files) stay allowed: a crafted index or
    symlink must not pull another model, or any other file on disk, into a merge."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or "\0" in name:
        raise CheckpointError(f"model '{ref}': '{name}' names a file outside the model directory {model_dir}")
    path = model_dir / name
    if not path.exists() and not path.is_symlink():
        return None
    real, home = path.resolve(), model_dir.resolve()
    in_cache = real.parent.name == "blobs" and real.parent.parent.name.startswith("models--")
    if not (real.is_relative_to(home) or in_cache):
        raise CheckpointError(f"model '{ref}': {path} leads outside the model directory (to {real})")
    if not path.is_file():
        raise CheckpointError(f"model '{ref}': {path} is not a regular file")
    return path


def read_json(model_dir: Path, name: str, ref: str, kind: type):
    """A JSON file of the model directory that must hold a `kind` (dict or list); None if absent."""
    path = model_file(model_dir, name, ref)
    if path is None:
        return None
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as f:
            value = json.loads(f.read())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"model '{ref}': {path} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"model '{ref}': {path} holds a JSON {type(value).__name__}, not an "
                              f"{'object' if kind is dict else 'array'}")
    return value


def _safetensors_files(path: Path, ref: str) -> list[Path]:
    """The weight files: those the index names (each inside the model directory), else every
    top-level .safetensors file."""
    index = read_json(path, "model.safetensors.index.json", ref, dict)
    if index is not None:
        where = path / "model.safetensors.index.json"
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"model '{ref}': {where} has no weight_map of tensor name -> file name")
        files = [(name, model_file(path, name, ref)) for name in sorted(set(weight_map.values()))]
        missing = [str(path / name) for name, f in files if f is None]
        if missing:
            raise CheckpointError(f"model '{ref}': shards listed in {where} are missing: {', '.join(missing)}")
        return [f for _, f in files]
    return [model_file(path, f.name, ref) for f in sorted(path.glob("*.safetensors"))]
