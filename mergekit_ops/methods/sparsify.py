"""Sparsifiers for task vectors: which entries of a delta survive, and how survivors are rescaled.

Rescale modes: 'l1' multiplies the survivors so the tensor keeps its L1 norm (mergekit's
behaviour); 'inverse_density' divides by density (the DARE paper); 'none' leaves them.
"""
from __future__ import annotations

import torch

from ..select import rank_window_mask, top_k_mask


def rescale(delta: torch.Tensor, kept: torch.Tensor, mode: str, density: float) -> torch.Tensor:
    if mode == "none":
        return kept
    if mode == "inverse_density":
        return kept / density
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def magnitude(delta: torch.Tensor, density: float, mode: str, k: int | None = None) -> torch.Tensor:
    """Keep the `density` share of entries with the largest magnitude (exactly k, ties by index)."""
    if density >= 1 and k is None:
        return delta
    k = int(density * delta.numel()) if k is None else k
    return rescale(delta, delta * top_k_mask(delta.abs(), k), mode, density)


def bernoulli(delta: torch.Tensor, density: float, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Keep each entry independently with probability `density` (DARE)."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=gen, device=delta.device) < density
    return rescale(delta, delta * keep, mode, density)


def breadcrumbs(delta: torch.Tensor, density: float, gamma: float, mode: str) -> torch.Tensor:
    """Drop the largest `gamma` share (outliers) and the smallest entries; keep `density`."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    top = min(top, n - keep)
    return rescale(delta, delta * rank_window_mask(delta.abs(), top, keep), mode, density)


def della(delta: torch.Tensor, density: float, epsilon: float, mode: str, gen: torch.Generator) -> torch.Tensor:
    """MAGPRUNE: along dim 1, keep probability rises linearly with magnitude rank from
    density - epsilon (smallest) to density + epsilon (largest). 'inverse_density' here divides each
    survivor by its own keep probability, as the DELLA paper does; 'l1' is mergekit's."""
    if density >= 1:
        return delta
    lanes = delta.reshape(1, -1) if delta.dim() < 2 else delta.movedim(1, -1)
    n = lanes.shape[-1]
    order = lanes.abs().argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(n, device=delta.device).expand_as(order))
    probs = (density - epsilon) + (2 * epsilon / max(n - 1, 1)) * ranks.to(delta.dtype)
    keep = torch.rand(lanes.shape, generator=gen, device=delta.device) < probs
    if mode == "inverse_density":
        kept = torch.where(keep, lanes / probs, torch.zeros_like(lanes))
    else:
        kept = lanes * keep
    kept = kept.reshape(delta.shape) if delta.dim() < 2 else kept.movedim(-1, 1)
    return rescale(delta, kept, mode, density) if mode == "l1" else kept
