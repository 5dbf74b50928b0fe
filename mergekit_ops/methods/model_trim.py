"""trim_scope: model — TIES as the paper has it: keep the top `density` share of each model's
task vector over the WHOLE model, not per tensor.

A pre-pass finds each model's global magnitude threshold with the same two-level radix histogram
as select.py, accumulated over all tensors, then gives every tensor its exact share k_t of the
global k: all entries above the threshold plus the threshold ties, handed out in plan order and
lowest flat index first. The merge then keeps exactly k_t entries of that tensor, so the union is
exactly the global top k with a defined tie-break.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ..errors import RecipeError
from ..select import HI_BINS, LO_BINS, cut_histogram, magnitude_bits


def plan_model_trim(tasks: list, load: Callable[[object], tuple[list[torch.Tensor], torch.Tensor]],
                    source: str) -> dict[str, dict]:
    """Return {tensor name: {"trim_k": {input index: k}}} for tasks that use trim_scope: model."""
    tasks = [t for t in tasks if not t.copy and t.params.get("trim_scope") == "model"]
    if not tasks:
        return {}
    n_models = len(tasks[0].inputs)
    densities = []
    for i in range(n_models):
        values = {t.model_params[i]["density"] for t in tasks}
        if len(values) > 1:
            raise RecipeError(f"trim_scope: model needs one density per model, model {i} has {sorted(values)}",
                              source, "density")
        densities.append(values.pop())
    total = sum(math.prod(t.shape) for t in tasks)
    want = [max(1, int(d * total)) if d < 1 else None for d in densities]
    hi_counts = [torch.zeros(HI_BINS, dtype=torch.int64) for _ in range(n_models)]
    for _, bits in _delta_bits(tasks, load, want):
        for i, b in bits.items():
            hi_counts[i] += torch.bincount(b >> 16, minlength=HI_BINS).cpu()  # counts on the CPU, bits on the device
    hi_cut = {i: cut_histogram(hi_counts[i], want[i]) for i in range(n_models) if want[i] is not None}
    lo_counts = {i: torch.zeros(LO_BINS, dtype=torch.int64) for i in hi_cut}
    per_task: list[dict[int, tuple[int, torch.Tensor]]] = []
    for _, bits in _delta_bits(tasks, load, want):
        row = {}
        for i, b in bits.items():
            bucket, _ = hi_cut[i]
            hi = b >> 16
            lo = torch.bincount(b[hi == bucket] & 0xFFFF, minlength=LO_BINS).cpu()
            lo_counts[i] += lo
            row[i] = (int((hi > bucket).sum()), lo)
        per_task.append(row)
    extras: dict[str, dict] = {}
    for i, (bucket, k_in) in hi_cut.items():
        c, ties = cut_histogram(lo_counts[i], k_in)
        for task, row in zip(tasks, per_task):
            above, lo = row[i]
            k = above + int(lo[c + 1:].sum())
            take = min(int(lo[c]), ties)
            ties -= take
            extras.setdefault(task.name, {"trim_k": {}})["trim_k"][i] = k + take
    return extras


def _delta_bits(tasks, load, want) -> Iterable[tuple[object, dict[int, torch.Tensor]]]:
    for task in tasks:
        inputs, base = load(task)
        # in place: each delta is fresh, and scratch bits would be one buffer shared by every input
        yield task, {i: magnitude_bits(x - base, in_place=True) for i, x in enumerate(inputs) if want[i] is not None}
