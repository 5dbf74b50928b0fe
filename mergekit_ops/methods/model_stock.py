"""model_stock: interpolate between the base and the mean of the fine-tunes by their agreement."""
from __future__ import annotations

import itertools

import torch

from .job import TensorJob


def stock_ratio(n: int, cos: torch.Tensor) -> torch.Tensor:
    """t = N*cos / (1 + (N-1)*cos), or 0 where the denominator vanishes."""
    denom = 1 + (n - 1) * cos
    return torch.where(denom.abs() < 1e-6, torch.zeros_like(cos), n * cos / denom)


def merge_model_stock(job: TensorJob) -> torch.Tensor:
    """cos is the mean pairwise cosine of the offsets x_i - base: of the whole tensors (streamed),
    or per row along the last dim with filter_wise."""
    n = len(job.tensors)
    pairs = list(itertools.combinations(range(n), 2))
    if job.params["filter_wise"]:
        xs, base = job.full()
        offsets = [(x - base).reshape(-1, base.shape[-1] if base.dim() else 1) for x in xs]
        cos = torch.stack([_cos((offsets[i] * offsets[j]).sum(-1), offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1))
                           for i, j in pairs]).mean(0)
        t = stock_ratio(n, cos).reshape(*base.shape[:-1], 1) if base.dim() else stock_ratio(n, cos).reshape(())
        return t * torch.stack(xs).mean(0) + (1 - t) * base
    upper = list(itertools.combinations_with_replacement(range(n), 2))

    def chunk_dots(sl, xs, base):
        offsets = [x.sub_(base) for x in xs]
        return [float(torch.dot(offsets[i], offsets[j])) for i, j in upper]
    dots = torch.zeros(n, n, dtype=torch.float64)
    for (i, j), v in zip(upper, job.sum_chunks(chunk_dots, len(upper))):
        dots[i, j] = v
    norms = dots.diagonal().sqrt()
    cos = torch.stack([_cos(dots[i, j], norms[i] * norms[j]) for i, j in pairs]).mean()
    t = float(stock_ratio(n, cos))
    return job.weighted_sum([t / n] * n, 1 - t)


def _cos(dot: torch.Tensor, norm_product: torch.Tensor) -> torch.Tensor:
    return (dot / norm_product.clamp_min(1e-6)).clamp(-1, 1)
