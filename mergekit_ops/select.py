"""Exact top-k masks by magnitude, without sorting, over a tensor streamed in chunks.

Non-negative float32 values order the same way as their bit patterns read as int32, so the k-th
largest value is found with two 16-bit histogram passes (radix select) instead of a full argsort
(~20x faster on an 11.5M-element tensor; sort does not use a second core). The passes take the
values chunk by chunk, so a tensor's magnitudes never need to exist in memory all at once.

Tie-break: exactly k positions are kept. Values equal to the threshold are kept lowest flat index
first. bf16 deltas take few distinct values, so ties at the threshold are common; this rule makes
the result a pure function of the tensor (mergekit's unstable argsort keeps an arbitrary subset).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

HI_BINS, LO_BINS = 1 << 15, 1 << 16


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """|values| as int32 bit patterns, ordered like the magnitudes."""
    return values.abs().reshape(-1).to(torch.float32).view(torch.int32)


def cut_histogram(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry, and how many entries of that bin are needed."""
    above = counts.flip(0).cumsum(0).flip(0)  # above[b] = entries in bins >= b
    b = int((above >= k).nonzero()[-1])
    return b, k - (int(above[b + 1]) if b + 1 < counts.numel() else 0)


def thresholds(bits_chunks: Callable[[], Iterable[torch.Tensor]], ks: list[int]) -> list[tuple[int, int, dict[int, int]]]:
    """(threshold bits, ties to keep, {flat offset of each chunk and of the end: threshold-equal
    entries before it}) of the k-th largest entry for each k in (0, numel), from one pass per
    histogram level shared by every k. The counts let every chunk find its share of the ties on
    its own, in any order."""
    hist = None
    for bits in bits_chunks():
        h = torch.bincount(bits >> 16, minlength=HI_BINS)
        hist = h if hist is None else hist + h
    cuts = [cut_histogram(hist, k) for k in ks]
    buckets = sorted({hi for hi, _ in cuts})
    lo_hists = {hi: torch.zeros(LO_BINS, dtype=torch.int64, device=hist.device) for hi in buckets}
    parts: dict[int, list[torch.Tensor]] = {hi: [] for hi in buckets}
    ends = []
    for bits in bits_chunks():
        ends.append((ends[-1] if ends else 0) + bits.numel())
        high = bits >> 16
        for hi in buckets:
            low = bits[high == hi] & 0xFFFF
            h = torch.bincount(low, minlength=LO_BINS)
            lo_hists[hi] += h
            parts[hi].append(low if low.numel() < LO_BINS else h.to(torch.int32))  # the smaller record
    out = []
    for hi, need in cuts:
        lo, ties = cut_histogram(lo_hists[hi], need)
        before, count = {0: 0}, 0
        for end, part in zip(ends, parts[hi]):
            count += int(part[lo]) if part.numel() == LO_BINS else int((part == lo).sum())
            before[end] = count
        out.append(((hi << 16) | lo, ties, before))
    return out


class TopK:
    """Keeps exactly the k largest magnitudes of a chunked tensor; `mask` takes the chunks in any order."""

    def __init__(self, k: int, numel: int, threshold: tuple[int, int, dict[int, int]] = (-1, 0, {})):
        self.k, self.numel = k, numel
        self.threshold, self.ties, self.before = threshold

    @classmethod
    def select(cls, bits_chunks: Callable[[], Iterable[torch.Tensor]], ks: list[int], numel: int) -> list["TopK"]:
        """One TopK per k, sharing the histogram passes."""
        inner = [k for k in ks if 0 < k < numel]
        found = dict(zip(inner, thresholds(bits_chunks, inner))) if inner else {}
        return [cls(k, numel, found.get(k, (-1, 0, {}))) for k in ks]

    def mask(self, start: int, bits: torch.Tensor) -> torch.Tensor:
        """Mask of the chunk at flat offset `start` (one `bits_chunks` yielded) from the bits of its magnitudes."""
        if self.k <= 0:
            return torch.zeros_like(bits, dtype=torch.bool)
        if self.k >= self.numel:
            return torch.ones_like(bits, dtype=torch.bool)
        keep = bits > self.threshold
        budget = self.ties - self.before[start]  # ties left to this chunk: lowest indices first
        if budget > 0:
            equal = bits == self.threshold
            if budget >= self.before[start + bits.numel()] - self.before[start]:
                keep |= equal
            else:
                keep[equal.nonzero().squeeze(1)[:budget]] = True
        return keep


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (same shape) of the k largest entries of a tensor; ties by lowest index."""
    bits = magnitude_bits(magnitude)
    [top] = TopK.select(lambda: [bits], [k], bits.numel())
    return top.mask(0, bits).view(magnitude.shape)
