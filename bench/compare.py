"""Compare two merged checkpoints tensor by tensor (fp32, one tensor at a time)."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open


def tensor_files(model_dir: str) -> dict[str, str]:
    """tensor name -> safetensors file of a checkpoint directory (sharded or not)."""
    out: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                out[name] = path
    return out


@dataclass
class Comparison:
    max_abs: float = 0.0
    worst: str = ""
    n_tensors: int = 0
    numel: int = 0
    n_elems_diff: int = 0      # elements that are not bit-equal after the fp32 cast
    differing: list[tuple[str, float]] = field(default_factory=list)   # (name, max abs diff) > tol
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)   # shape or dtype differences, described
    nonfinite: list[str] = field(default_factory=list)
    config_diffs: list[str] = field(default_factory=list)

    @property
    def structural_ok(self) -> bool:
        return not (self.only_a or self.only_b or self.mismatched or self.config_diffs)


CONFIG_KEYS = ("num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size", "tie_word_embeddings")


def compare_dirs(a: str, b: str, tol: float = 1e-5, check_dtype: bool = True) -> Comparison:
    c = Comparison()
    fa, fb = tensor_files(a), tensor_files(b)
    c.only_a = sorted(set(fa) - set(fb))
    c.only_b = sorted(set(fb) - set(fa))
    handles: dict[str, object] = {}

    def get(path: str, name: str) -> torch.Tensor:
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        return handles[path].get_tensor(name)   # type: ignore[attr-defined]

    try:
        for name in sorted(set(fa) & set(fb)):
            ta, tb = get(fa[name], name), get(fb[name], name)
            c.n_tensors += 1
            if ta.shape != tb.shape:
                c.mismatched.append(f"{name}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
                continue
            if check_dtype and ta.dtype != tb.dtype:
                c.mismatched.append(f"{name}: dtype {ta.dtype} vs {tb.dtype}")
            xa, xb = ta.float(), tb.float()
            del ta, tb
            if not (torch.isfinite(xa).all() and torch.isfinite(xb).all()):
                c.nonfinite.append(name)
            d = (xa - xb).abs_()
            d.nan_to_num_(nan=float("inf"))
            m = float(d.max()) if d.numel() else 0.0
            c.numel += d.numel()
            c.n_elems_diff += int(torch.count_nonzero(d))
            del xa, xb, d
            if m > c.max_abs or not c.worst:
                c.max_abs, c.worst = m, name
            if m > tol:
                c.differing.append((name, m))
    finally:
        handles.clear()
    for cfg_key in CONFIG_KEYS:
        va, vb = _config(a).get(cfg_key), _config(b).get(cfg_key)
        if va != vb:
            c.config_diffs.append(f"config.json {cfg_key}: {va!r} vs {vb!r}")
    return c


def _config(d: str) -> dict:
    try:
        with open(os.path.join(d, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def tail(path: str, n: int = 8) -> str:
    """The last n lines of a log file ('' if unreadable), for error reports."""
    try:
        with open(path) as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""
