"""sce: select high-variance positions, calculate per-model weights, erase minority signs."""
from __future__ import annotations

import torch

from ..select import top_k_mask
from .job import TensorJob


def merge_sce(job: TensorJob) -> torch.Tensor:
    xs, base = job.full()
    deltas = torch.stack([x - base for x in xs])
    topk = job.params["select_topk"]
    if topk < 1:
        var = deltas.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * topk)
        deltas = deltas * top_k_mask(var, k)
    energy = (deltas ** 2).mean(dim=tuple(range(1, deltas.dim())))
    total = float(energy.sum())
    weights = energy / total if total >= 1e-6 else torch.full_like(energy, 1.0 / len(xs))
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = deltas.sign() == majority
    w = weights.reshape(-1, *([1] * (deltas.dim() - 1))) * agree
    return base + (w * deltas).sum(0) / w.sum(0).clamp_min(1e-6)
