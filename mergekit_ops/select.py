"""Exact top-k masks by magnitude, without sorting.

Non-negative float32 values order the same way as their bit patterns read as int32, so the k-th
largest value is found with two 16-bit histogram passes (radix select) instead of a full argsort
(~20x faster on an 11.5M-element tensor, and sort does not use a second core).

Tie-break: exactly k positions are kept. Values equal to the threshold are kept lowest flat index
first. bf16 deltas take few distinct values, so ties at the threshold are common; this rule makes
the result a pure function of the tensor (mergekit's unstable argsort keeps an arbitrary subset).
"""
from __future__ import annotations

import torch


def kth_largest_bits(bits: torch.Tensor, k: int) -> int:
    """Bit pattern of the k-th largest (1-based) of non-negative float32 values given as int32 bits."""
    hi = bits >> 16
    counts = torch.bincount(hi, minlength=1 << 15)
    above = counts.flip(0).cumsum(0).flip(0)  # above[b] = how many have hi >= b
    b = int((above >= k).nonzero().max())
    k_in = k - (int(above[b + 1]) if b + 1 < above.numel() else 0)
    lo = bits[hi == b] & 0xFFFF
    counts_lo = torch.bincount(lo, minlength=1 << 16)
    above_lo = counts_lo.flip(0).cumsum(0).flip(0)
    c = int((above_lo >= k_in).nonzero().max())
    return (b << 16) | c


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (same shape) of the k largest entries of a non-negative tensor; ties by lowest index."""
    flat = magnitude.reshape(-1)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(magnitude, dtype=torch.bool)
    bits = flat.to(torch.float32).view(torch.int32)
    threshold = kth_largest_bits(bits, k)
    mask = bits > threshold
    need = k - int(mask.sum())
    equal = bits == threshold
    mask |= equal & (equal.cumsum(0) <= need)
    return mask.view(magnitude.shape)


def rank_window_mask(magnitude: torch.Tensor, skip_top: int, keep: int) -> torch.Tensor:
    """Entries ranked (skip_top, skip_top + keep] by magnitude, descending, ties by lowest index."""
    keep_upto = top_k_mask(magnitude, skip_top + keep)
    return keep_upto & ~top_k_mask(magnitude, skip_top) if skip_top > 0 else keep_upto
