"""LoRA adapters as merge inputs: `base+adapter` is the base with a PEFT LoRA adapter merged in.

What PEFT's `merge_and_unload` builds, applied to each tensor as it is read, so no whole PEFT
model is ever loaded: a target module's weight W becomes W + scale * (B @ A) (transposed for
`fan_in_fan_out` layers and for embeddings), scale = lora_alpha / r (lora_alpha / sqrt(r) with
`use_rslora`), r and lora_alpha per module from `rank_pattern` / `alpha_pattern`. Tensors the
adapter saves whole (`modules_to_save`, an embedding's `base_layer`) replace the base's first.
The sum is taken in float32 and rounded once to the base tensor's dtype. Adapter kinds whose
merge is something else (DoRA, LoRA biases, ...) are refused by name.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import model_file, read_json, resolve_model_dir
from .errors import CheckpointError
from .safetensors_io import TensorInfo, read_header

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# adapter_config.json settings whose merge is not W + scale * B @ A: each must be off
NOT_PLAIN = {
    "use_dora": "DoRA (weight-decomposed LoRA)", "lora_bias": "LoRA biases", "use_qalora": "QA-LoRA",
    "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
    "target_parameters": "LoRA on bare parameters", "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
}
_PART = re.compile(r"(?P<module>.+)\.(?:(?P<lin>lora_[AB])\.weight|(?P<emb>lora_embedding_[AB])|base_layer\.weight)")


def split_ref(ref: str, base_dir: Path | None = None) -> tuple[str, str] | None:
    """(model, adapter) of a `model+adapter` reference, None for a plain one. A folder whose own
    name holds a '+' stays a plain model."""
    if "+" not in ref or Path(os.path.expanduser(ref)).is_dir() or (base_dir and (base_dir / ref).is_dir()):
        return None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(f"model '{ref}': a LoRA reference is MODEL+ADAPTER, one '+' between two non-empty parts")
    return parts[0], parts[1]


def input_dirs(ref: str, base_dir: Path | None = None) -> dict[str, Path]:
    """The folders a model reference reads, keyed by what each is (for messages)."""
    lora = split_ref(ref, base_dir)
    if lora is None:
        return {f"model '{ref}'": resolve_model_dir(ref, base_dir)}
    return {f"model '{lora[0]}'": resolve_model_dir(lora[0], base_dir),
            f"adapter '{lora[1]}'": resolve_model_dir(lora[1], base_dir)}


@dataclass(frozen=True)
class Update:
    """What the adapter does to one tensor of the base."""

    a: TensorInfo | None = None  # lora_A (r x in) or lora_embedding_A (r x rows)
    b: TensorInfo | None = None  # lora_B (out x r) or lora_embedding_B (cols x r)
    scale: float = 0.0
    transpose: bool = False  # B @ A is (in x out): fan_in_fan_out layers and embeddings
    whole: TensorInfo | None = None  # a saved copy that replaces the base's tensor


@dataclass
class Adapter:
    """A PEFT LoRA adapter folder: its config, and an Update per base tensor it changes."""

    ref: str
    path: Path
    updates: dict[str, Update]

    @classmethod
    def open(cls, ref: str, base_dir: Path | None = None) -> "Adapter":
        path = resolve_model_dir(ref, base_dir)
        config = read_json(path, CONFIG, ref, dict)
        if config is None:
            raise CheckpointError(f"adapter '{ref}': no {CONFIG} in {path}: not a PEFT adapter folder")
        where = path / CONFIG
        kind = config.get("peft_type", "LORA")
        if kind != "LORA":
            raise CheckpointError(f"adapter '{ref}': {where} says peft_type {kind}; only LoRA adapters can be merged")
        on = [k for k in NOT_PLAIN if config.get(k) not in (None, False, [], {}, "none")]
        if on:
            raise CheckpointError(f"adapter '{ref}': {where} sets {on[0]} ({NOT_PLAIN[on[0]]}), which merges "
                                  "differently from plain LoRA and is not supported")
        if config.get("bias", "none") != "none":
            raise CheckpointError(f"adapter '{ref}': {where} trains biases (bias: {config['bias']}), not supported")
        weights = model_file(path, WEIGHTS, ref)
        if weights is None:
            there = sorted(p.name for p in path.iterdir() if p.name.startswith("adapter_model"))
            raise CheckpointError(f"adapter '{ref}': no {WEIGHTS} in {path}"
                                  + (f" (found {', '.join(there)}: pickle adapters are refused)" if there else ""))
        infos, _ = read_header(weights)
        return cls(ref, path, _updates(ref, weights, infos, config))

    def check(self, tensors: dict[str, TensorInfo], model: str) -> None:
        """Every tensor the adapter changes exists in the base with the shape it expects."""
        for name, u in self.updates.items():
            info = tensors.get(name)
            if info is None:
                raise CheckpointError(f"adapter '{self.ref}' changes '{name}', which model '{model}' does not have: "
                                      "is it an adapter of another base?")
            if u.whole is not None and u.whole.shape != info.shape:
                raise CheckpointError(
                    f"adapter '{self.ref}': '{u.whole.name}' has shape {list(u.whole.shape)} but '{name}' of model "
                    f"'{model}' has {list(info.shape)} (an adapter for a resized vocabulary?)")
            if u.a is not None:
                rows, cols = u.b.shape[0], u.a.shape[1]
                got = (cols, rows) if u.transpose else (rows, cols)
                if tuple(info.shape) != got:
                    raise CheckpointError(
                        f"adapter '{self.ref}': '{u.b.name}' @ '{u.a.name}' gives shape {list(got)} but '{name}' of "
                        f"model '{model}' has {list(info.shape)}: is it an adapter of another base?")

    def apply(self, name: str, w: torch.Tensor, read: Callable[[TensorInfo], torch.Tensor]) -> torch.Tensor:
        """Tensor `name` of the base (`w`, as read) with the adapter merged in; `read` reads adapter tensors."""
        u = self.updates.get(name)
        if u is None:
            return w
        if u.whole is not None:
            w = read(u.whole).to(w.dtype)
        if u.a is None:
            return w
        delta = read(u.b).float() @ read(u.a).float()
        if u.transpose:
            delta = delta.T
        return (w.float() + delta * u.scale).to(w.dtype)


def _updates(ref: str, weights: Path, infos: dict[str, TensorInfo], config: dict) -> dict[str, Update]:
    """Group the adapter's tensors by the base tensor they change, with each module's scale."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    for key, info in infos.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"adapter '{ref}': {weights}: tensor '{key}' does not start with '{PREFIX}' "
                                  "as PEFT's LoRA tensors do")
        m = _PART.fullmatch(key[len(PREFIX):])
        if m is None:  # a modules_to_save copy, named as the base's tensor
            if ".lora_" in key:
                raise CheckpointError(f"adapter '{ref}': {weights}: tensor '{key}' is not a LoRA part this "
                                      "tool knows (lora_A / lora_B / lora_embedding_A / lora_embedding_B)")
            parts.setdefault(key[len(PREFIX):], {})["whole"] = info
            continue
        part = m["lin"] or m["emb"] or "whole"
        parts.setdefault(m["module"] + ".weight", {})[part] = info
    updates = {}
    for name, got in sorted(parts.items()):
        module = name.removesuffix(".weight")
        emb = "lora_embedding_A" in got or "lora_embedding_B" in got
        kind = "lora_embedding_" if emb else "lora_"
        a, b = got.get(kind + "A"), got.get(kind + "B")
        if (a is None) != (b is None):
            have, lack = (a, "B") if b is None else (b, "A")
            raise CheckpointError(f"adapter '{ref}': {weights} has '{have.name}' but not its lora_{lack} partner")
        if a is None:
            updates[name] = Update(whole=got["whole"])
            continue
        r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(f"adapter '{ref}': '{a.name}' {list(a.shape)} and '{b.name}' {list(b.shape)} "
                                  f"do not have rank {r}, as {CONFIG} says for module '{module}'")
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        updates[name] = Update(a, b, scale, transpose=emb or bool(config.get("fan_in_fan_out")),
                               whole=got.get("whole"))
    return updates


def _pattern_value(patterns: dict | None, module: str, default):
    """The value of the first pattern that matches the module's name at a dot boundary (PEFT's rule)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default
