"""Exact top-k masks by magnitude, without sorting, over a tensor streamed in chunks.

Non-negative float32 values order the same way as their bit patterns read as int32, so the k-th
largest value is found with two 16-bit histogram passes (radix select) instead of a full argsort
(much faster, and sort does not use a second core; measured: docs/benchmarks.md). The passes take
the values slice by slice (chunks.span: a chunk on the CPU, GPU_CHUNKS chunks, 16M elements, on a
GPU), so a tensor's magnitudes never need to exist in memory all at once, and on the merge's pool,
slices side by side. ("Chunk" below means such a slice.)

Tie-break: exactly k positions are kept. Values equal to the threshold are kept lowest flat index
first. bf16 deltas take few distinct values, so ties at the threshold are common; this rule makes
the result a pure function of the tensor (mergekit's unstable argsort keeps an arbitrary subset).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .chunks import CHUNK, scratch, span

HI_BINS, LO_BINS = 1 << 15, 1 << 16


def magnitude_bits(values: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """|values| as int32 bit patterns, ordered like the magnitudes. float32 values of at most
    a slice (chunks.span) go into this thread's scratch buffer (valid until the next call), or over the
    values themselves with in_place."""
    if values.dtype == torch.float32 and (in_place or values.numel() <= span(values.device)):
        out = values if in_place else scratch(1, torch.float32, values.device, "bits")[0][:values.numel()]
        return torch.abs(values.reshape(-1), out=out.reshape(-1)).view(torch.int32)
    return values.abs().reshape(-1).to(torch.float32).view(torch.int32)


def below(x: torch.Tensor, bound: int) -> torch.Tensor:
    """x < bound as a 0/1 uint8 mask of a chunk of integers, by arithmetic: x - bound is negative
    exactly there, and its sign bit shifted down is -1 (torch's comparisons write bools element by
    element, which is slower: docs/benchmarks.md). x - bound must fit x's dtype."""
    diff = torch.sub(x, bound, out=scratch(1, x.dtype, x.device, "select")[0][:x.numel()])
    return diff.bitwise_right_shift_(8 * x.element_size() - 1).neg_().to(torch.uint8)


def above(bits: torch.Tensor, threshold: int) -> torch.Tensor:
    """bits > threshold as a 0/1 uint8 mask; bits are non-negative int32."""
    if threshold >= (1 << 31) - 1:
        return torch.zeros_like(bits, dtype=torch.uint8)
    return below(bits, threshold + 1).bitwise_xor_(1)


def cut_histogram(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry, and how many entries of that bin are needed."""
    at_least = counts.flip(0).cumsum(0).flip(0)  # at_least[b] = entries in bins >= b
    b = int((at_least >= k).nonzero()[-1])
    return b, k - (int(at_least[b + 1]) if b + 1 < counts.numel() else 0)


MapBits = Callable[[Callable[[torch.Tensor], Any]], list]


def thresholds(map_bits: MapBits, ks: list[int]) -> list[tuple[int, int, dict[int, int]]]:
    """(threshold bits, ties to keep, {flat offset of each chunk and of the end: threshold-equal
    entries before it}) of the k-th largest entry for each k in (0, numel), from one pass per
    histogram level shared by every k. map_bits(fn) applies fn to every chunk's magnitude bits
    (fn may overwrite them), in any order, and returns the results in chunk order: histograms are
    integer sums, so the passes run chunks side by side. The counts let every chunk find its share
    of the ties on its own, in any order."""
    hist = sum(map_bits(lambda bits: torch.bincount(bits.bitwise_right_shift_(16), minlength=HI_BINS)))
    cuts = [cut_histogram(hist, k) for k in ks]
    buckets = sorted({hi for hi, _ in cuts})
    per_chunk = map_bits(lambda bits: (bits.numel(), [bucket_histogram(bits, hi) for hi in buckets]))
    out = []
    for hi, need in cuts:
        j = buckets.index(hi)
        lo, ties = cut_histogram(sum(hists[j] for _, hists in per_chunk), need)
        before, count, end = {0: 0}, 0, 0
        for n, hists in per_chunk:
            end, count = end + n, count + int(hists[j][lo])
            before[end] = count
        out.append(((hi << 16) | lo, ties, before))
    return out


def bucket_histogram(bits: torch.Tensor, hi: int) -> torch.Tensor:
    """Counts (int32) of the low 16 bits among the entries whose high 16 bits are `hi`. Shifted so
    the bucket lands in bins 1..LO_BINS and every other entry clamps into the two end bins: no
    boolean indexing (a comparison and a gather cost more than the whole histogram, measured in
    docs/benchmarks.md)."""
    shifted = torch.sub(bits, (hi << 16) - 1, out=scratch(1, torch.int32, bits.device, "select")[0][:bits.numel()])
    return torch.bincount(shifted.clamp_(0, LO_BINS + 1), minlength=LO_BINS + 2)[1:LO_BINS + 1].to(torch.int32)


class TopK:
    """Keeps exactly the k largest magnitudes of a chunked tensor; `mask` takes the chunks in any order."""

    def __init__(self, k: int, numel: int, threshold: tuple[int, int, dict[int, int]] = (-1, 0, {})):
        self.k, self.numel = k, numel
        self.threshold, self.ties, self.before = threshold

    @classmethod
    def select(cls, map_bits: MapBits, ks: list[int], numel: int) -> list["TopK"]:
        """One TopK per k, sharing the histogram passes (see thresholds for map_bits)."""
        inner = [k for k in ks if 0 < k < numel]
        found = dict(zip(inner, thresholds(map_bits, inner))) if inner else {}
        return [cls(k, numel, found.get(k, (-1, 0, {}))) for k in ks]

    def mask(self, start: int, bits: torch.Tensor) -> torch.Tensor:
        """0/1 uint8 mask of the chunk at flat offset `start` (one map_bits gave) from the bits of
        its magnitudes."""
        if self.k <= 0:
            return torch.zeros_like(bits, dtype=torch.uint8)
        if self.k >= self.numel:
            return torch.ones_like(bits, dtype=torch.uint8)
        budget = self.ties - self.before[start]  # ties left to this chunk: lowest indices first
        if budget <= 0:
            return above(bits, self.threshold)
        if budget >= self.before[start + bits.numel()] - self.before[start]:
            return above(bits, self.threshold - 1)  # every tie in the chunk
        keep = above(bits, self.threshold)
        keep[(bits == self.threshold).nonzero().squeeze(1)[:budget]] = 1
        return keep


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (same shape) of the k largest entries of a tensor; ties by lowest index."""
    chunks = magnitude_bits(magnitude).split(CHUNK)
    [top] = TopK.select(lambda fn: [fn(c.clone()) for c in chunks], [k], magnitude.numel())
    masks = [top.mask(i * CHUNK, c) for i, c in enumerate(chunks)]
    return torch.cat(masks).view(magnitude.shape).bool() if masks else torch.zeros_like(magnitude, dtype=torch.bool)
