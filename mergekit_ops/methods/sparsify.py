"""Sparsifiers for task vectors: which entries of a delta survive, and how survivors are rescaled.

Each sparsifier is built for one (tensor, input): its constructor makes the passes it needs over
the delta (thresholds), set_l1_scales the norm pass of all inputs together, then `apply` is called
once per slice (chunks.span; "chunk" below), in any order.

Rescale modes: 'l1' scales the survivors so the tensor keeps its L1 norm (mergekit's behaviour;
skipped when either norm is below 1e-7); 'inverse_density' divides by density (the DARE paper);
'none' leaves them.
"""
from __future__ import annotations

import torch

from ..chunks import scratch
from ..select import TopK, below, magnitude_bits
from .job import TensorJob


def masked(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """delta * mask (bool or 0/1 uint8) in place, the same bits."""
    return delta.mul_(mask_factor(delta, mask))


def mask_factor(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A mask (bool or 0/1 uint8) as 0/1 in delta's dtype and shape. A bool operand takes torch's
    slow mixed-dtype path (measured: docs/benchmarks.md), so it is converted from uint8 first, into
    a reused buffer (a fresh one page-faults; delta is at most a slice long)."""
    factor = scratch(1, delta.dtype, delta.device, "mask")[0][:delta.numel()].view(delta.shape)
    return factor.copy_(mask.view(torch.uint8))


class Sparsifier:
    """Keeps everything (density >= 1); subclasses override `keep`. Masks are pure functions of
    the chunk, so chunks are sparsified in any order."""

    scale = 1.0
    l1 = False  # rescale to the delta's L1 norm: set_l1_scales sets `scale`
    sparsifies = False  # True where entries may be dropped; a merge of none may skip the deltas

    def keep(self, sl: slice, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def kept_l1(self, sl: slice, magnitude: torch.Tensor) -> float:
        """The L1 norm of what keep() keeps of a chunk, from its |delta| (a mask keeps |d| where
        it keeps d), in the norm pass; magnitude may be overwritten."""
        return float(self.keep(sl, magnitude).sum())

    def apply(self, sl: slice, delta: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """The kept entries of a chunk's delta, rescaled and weighted, in place (one pass for both)."""
        kept = self.keep(sl, delta)
        return kept.mul_(self.scale * weight) if self.scale * weight != 1.0 else kept

    def _set_rescale(self, mode: str, density: float) -> None:
        if mode == "inverse_density":
            self.scale = 1.0 / density
        self.l1 = mode == "l1"


def set_l1_scales(job: TensorJob, sparse: list[Sparsifier]) -> None:
    """The 'l1' rescale of every input that asks for it, from one pass over the chunks (side by
    side on the pool; partial norms added in chunk order; TensorJob.sum_deltas)."""
    inputs = [i for i, s in enumerate(sparse) if s.l1]
    if not inputs:
        return

    def norms(sl, i, delta):  # the L1 norms of input i's delta and of what it keeps
        magnitude = delta.abs_()
        return [float(magnitude.sum()), sparse[i].kept_l1(sl, magnitude)]
    totals = job.sum_deltas(inputs, norms, 2)
    for k, i in enumerate(inputs):
        before, after = totals[2 * k], totals[2 * k + 1]
        sparse[i].scale = before / after if before >= 1e-7 and after >= 1e-7 else 1.0


def magnitudes(job: TensorJob, i: int):
    """TopK's map_bits over the magnitudes of input i's delta, chunks side by side on the pool."""
    def over_bits(fn):
        return [r for (r,) in job.map_deltas([i], lambda sl, _, delta: fn(magnitude_bits(delta, in_place=True)))]
    return over_bits


class Magnitude(Sparsifier):
    """Keep the k = max(1, floor(density * numel)) largest magnitudes (ties by lowest index)."""

    sparsifies = True

    def __init__(self, job: TensorJob, i: int, density: float, mode: str, k: int | None = None):
        k = max(1, int(density * job.numel)) if k is None else k
        [self.top] = TopK.select(magnitudes(job, i), [k], job.numel)
        self._set_rescale(mode, density)

    def keep(self, sl, delta):
        return masked(delta, self.top.mask(sl.start, magnitude_bits(delta)))


class Window(Sparsifier):
    """Breadcrumbs: drop the floor(gamma * n) largest (fewer if density + gamma > 1) and the smallest;
    keep floor(density * n)."""

    sparsifies = True

    def __init__(self, job: TensorJob, i: int, density: float, gamma: float, mode: str):
        n = job.numel
        keep, top = int(density * n), int(gamma * n)
        top = min(top, n - keep)
        self.upto, self.skip = TopK.select(magnitudes(job, i), [top + keep, top], n)
        self._set_rescale(mode, density)

    def keep(self, sl, delta):
        bits = magnitude_bits(delta)
        # the largest `top` are a prefix of the largest `top + keep` (one order, ties by index)
        return masked(delta, self.upto.mask(sl.start, bits).sub_(self.skip.mask(sl.start, bits)))


class Bernoulli(Sparsifier):
    """DARE: keep each entry with probability density, drawn from the (tensor, input, chunk)
    stream (TensorJob.random_words).

    An entry is kept when a uniform 15-bit integer is below round(density * 2**15), at most
    2**15 - 1 (so the keep probability is density to within 2**-15): each 64-bit word gives four
    draws (the low 15 bits of each 16), a quarter of the generator work of float draws.
    The masks drawn for the L1 norm pass are kept for the merge pass instead of drawn twice.
    """

    sparsifies = True

    def __init__(self, job: TensorJob, i: int, density: float, mode: str):
        self.job, self.input = job, i
        self.threshold = min(round(density * (1 << 15)), (1 << 15) - 1)
        self.saved: dict[int, torch.Tensor] = {}  # slice start -> mask, from the norm pass
        self._set_rescale(mode, density)

    def draw(self, sl: slice, device: torch.device) -> torch.Tensor:
        words = self.job.slice_words(self.input, sl).to(device)
        return below(words.view(torch.int16)[:sl.stop - sl.start].bitwise_and_(0x7FFF), self.threshold)

    def keep(self, sl, delta):
        mask = self.saved.pop(sl.start, None)  # each slice merges once
        return masked(delta, mask if mask is not None else self.draw(sl, delta.device))

    def kept_l1(self, sl, magnitude):
        mask = self.saved[sl.start] = self.draw(sl, magnitude.device)
        # one pass, not a multiply and a sum
        return float(torch.dot(magnitude.reshape(-1), mask_factor(magnitude, mask).reshape(-1)))


class Della(Sparsifier):
    """MAGPRUNE: along dim 1, keep probability rises linearly with magnitude rank, from
    density - epsilon (smallest) to density + epsilon (largest). 'inverse_density' divides each
    survivor by its own keep probability, as the DELLA paper does; 'l1' is mergekit's."""

    sparsifies = True

    def __init__(self, job: TensorJob, i: int, density: float, epsilon: float, mode: str):
        delta = job.convert(job.tensors[i]) - job.convert(job.base)
        lanes = delta.reshape(1, -1) if delta.dim() < 2 else delta.movedim(1, -1)
        n = lanes.shape[-1]
        order = lanes.abs().argsort(dim=-1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(n, device=delta.device).expand_as(order))
        probs = (density - epsilon) + (2 * epsilon / max(n - 1, 1)) * ranks.to(delta.dtype)
        keep = torch.rand(lanes.shape, generator=job.generator(i), device="cpu").to(delta.device) < probs
        kept = torch.where(keep, lanes / probs, 0.0) if mode == "inverse_density" else lanes * keep
        kept = kept.reshape(-1) if delta.dim() < 2 else kept.movedim(-1, 1).reshape(-1)
        if mode == "l1":
            before, after = float(delta.abs().sum()), float(kept.abs().sum())
            if before >= 1e-7 and after >= 1e-7:
                kept *= before / after
        self.kept = kept

    def apply(self, sl, delta, weight=1.0):
        return self.kept[sl].mul_(weight)  # each chunk is applied once
