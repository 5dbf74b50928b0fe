"""Sparsifiers for task vectors: which entries of a delta survive, and how survivors are rescaled.

Each sparsifier is built for one (tensor, input): its constructor makes the passes it needs over
the delta (thresholds, norms), then `apply` is called once per chunk, in any order unless `ordered`.

Rescale modes: 'l1' scales the survivors so the tensor keeps its L1 norm (mergekit's behaviour;
skipped when either norm is below 1e-7); 'inverse_density' divides by density (the DARE paper);
'none' leaves them.
"""
from __future__ import annotations

import torch

from ..select import TopK, magnitude_bits
from .base import CHUNK, TensorJob


def masked(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """delta * mask in place, the same bits; a bool operand takes torch's slow mixed-dtype path
    (~8x slower than converting it from uint8 first)."""
    return delta.mul_(mask.view(torch.uint8).to(delta.dtype))


class Sparsifier:
    """Keeps everything (density >= 1); subclasses override `keep`."""

    scale = 1.0
    ordered = False  # True: `apply` must see the chunks in order (it carries state from one to the next)

    def keep(self, sl: slice, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def apply(self, sl: slice, delta: torch.Tensor) -> torch.Tensor:
        kept = self.keep(sl, delta)
        return kept * self.scale if self.scale != 1.0 else kept

    def _set_scale(self, job: TensorJob, i: int, mode: str, density: float, replay: "Sparsifier") -> None:
        """replay: an identical sparsifier whose masks are drawn for the L1 norm pass."""
        if mode == "inverse_density":
            self.scale = 1.0 / density
        elif mode == "l1":
            before = after = 0.0
            for sl, d in job.delta_chunks(i):
                magnitude = d.abs_()  # a mask keeps |d| where it keeps d: one pass fewer
                before += float(magnitude.sum())
                after += float(replay.keep(sl, magnitude).sum())
            self.scale = before / after if before >= 1e-7 and after >= 1e-7 else 1.0


class Magnitude(Sparsifier):
    """Keep the k = max(1, floor(density * numel)) largest magnitudes (ties by lowest index)."""

    def __init__(self, job: TensorJob, i: int, density: float, mode: str, k: int | None = None):
        k = max(1, int(density * job.numel)) if k is None else k
        [self.top] = TopK.select(lambda: (magnitude_bits(d) for _, d in job.delta_chunks(i)), [k], job.numel)
        self._set_scale(job, i, mode, density, self)

    def keep(self, sl, delta):
        return masked(delta, self.top.mask(sl.start, magnitude_bits(delta)))


class Window(Sparsifier):
    """Breadcrumbs: drop the floor(gamma * n) largest (fewer if density + gamma > 1) and the smallest;
    keep floor(density * n)."""

    def __init__(self, job: TensorJob, i: int, density: float, gamma: float, mode: str):
        n = job.numel
        keep, top = int(density * n), int(gamma * n)
        top = min(top, n - keep)
        bits = lambda: (magnitude_bits(d) for _, d in job.delta_chunks(i))  # noqa: E731
        self.upto, self.skip = TopK.select(bits, [top + keep, top], n)
        self._set_scale(job, i, mode, density, self)

    def keep(self, sl, delta):
        bits = magnitude_bits(delta)
        return masked(delta, self.upto.mask(sl.start, bits) & ~self.skip.mask(sl.start, bits))


class Bernoulli(Sparsifier):
    """DARE: keep each entry with probability density, drawn from the (tensor, input) generator.

    An entry is kept when a uniform 24-bit integer is below round(density * 2**24): half the
    generator work of float draws. With the L1 rescale, the masks of the norm pass are kept for
    the merge pass instead of being drawn twice.
    """

    def __init__(self, job: TensorJob, i: int, density: float, mode: str):
        self.threshold, self.gen = round(density * (1 << 24)), job.generator(i)
        self.masks: list[torch.Tensor] | None = None
        if mode == "l1":
            self.masks = []
            self._set_scale(job, i, mode, density, _Recording(self))
        else:
            self._set_scale(job, i, mode, density, self)
        self.ordered = self.masks is None  # drawn while merging: in chunk order

    def draw(self, n: int, device: torch.device) -> torch.Tensor:
        words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(generator=self.gen)
        low = words.view(torch.int32)[:n]
        return torch.bitwise_and(low, 0xFFFFFF, out=low) < self.threshold

    def keep(self, sl, delta):
        if self.masks is None:
            return masked(delta, self.draw(delta.numel(), delta.device))
        mask, self.masks[sl.start // CHUNK] = self.masks[sl.start // CHUNK], None  # each chunk merges once
        return masked(delta, mask)


class _Recording(Sparsifier):
    """Draws a Bernoulli sparsifier's masks for the norm pass and stores them for the merge pass."""

    def __init__(self, owner: Bernoulli):
        self.owner = owner

    def keep(self, sl, delta):
        mask = self.owner.draw(delta.numel(), delta.device)
        self.owner.masks.append(mask)
        return masked(delta, mask)


class Della(Sparsifier):
    """MAGPRUNE: along dim 1, keep probability rises linearly with magnitude rank, from
    density - epsilon (smallest) to density + epsilon (largest). 'inverse_density' divides each
    survivor by its own keep probability, as the DELLA paper does; 'l1' is mergekit's."""

    def __init__(self, job: TensorJob, i: int, density: float, epsilon: float, mode: str):
        delta = job.convert(job.tensors[i]) - job.convert(job.base)
        lanes = delta.reshape(1, -1) if delta.dim() < 2 else delta.movedim(1, -1)
        n = lanes.shape[-1]
        order = lanes.abs().argsort(dim=-1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(n, device=delta.device).expand_as(order))
        probs = (density - epsilon) + (2 * epsilon / max(n - 1, 1)) * ranks.to(delta.dtype)
        keep = torch.rand(lanes.shape, generator=job.generator(i), device=delta.device) < probs
        kept = torch.where(keep, lanes / probs, 0.0) if mode == "inverse_density" else lanes * keep
        kept = kept.reshape(-1) if delta.dim() < 2 else kept.movedim(-1, 1).reshape(-1)
        if mode == "l1":
            before, after = float(delta.abs().sum()), float(kept.abs().sum())
            if before >= 1e-7 and after >= 1e-7:
                kept *= before / after
        self.kept = kept

    def apply(self, sl, delta):
        return self.kept[sl]
