"""Truncated SVD factors of a weight delta, the same bytes on every run.

A LoRA module stores delta ~= B @ A. The best rank-k approximation (in the Frobenius norm) is the
truncated SVD U_k S_k V_k^T (Eckart-Young); we split S evenly, B = U_k sqrt(S_k) and
A = sqrt(S_k) V_k^T, so both factors have the same scale and round alike to a 16-bit dtype.
Determinism: LAPACK's SVD gives different bits with different thread counts (MKL, measured on
torch 2.13), and each singular pair's sign is arbitrary. The SVD runs on one thread, and each pair
is flipped so that the largest-magnitude entry of its column of U is positive.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU kernels on one thread meanwhile (torch's setting is process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) in float32 with B @ A the best rank-k approximation of the 2-D `delta`, where
    k = min(rank, *delta.shape): B is (out x k), A is (k x in)."""
    with one_thread():
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, s.numel())
    u, s, vh = u[:, :k], s[:k], vh[:k]
    # argmax takes the first of equal magnitudes, so the flip is defined for any input
    rows = u.abs().argmax(dim=0)
    signs = torch.where(u[rows, torch.arange(k)] < 0, -1.0, 1.0)
    half = s.sqrt() * signs  # the sign goes on both factors: their product keeps it squared, +1
    return (u * half).contiguous(), (vh * half[:, None]).contiguous()


def relative_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """||delta - B @ A|| / ||delta|| (Frobenius) in float32; 0 for a zero delta. On one thread,
    as the factors: the report is part of the output, and must not change with the thread count."""
    delta = delta.float()
    with one_thread():
        norm = torch.linalg.matrix_norm(delta).item()
        rest = torch.linalg.matrix_norm(delta - b.float() @ a.float()).item()
    return rest / norm if norm else 0.0
