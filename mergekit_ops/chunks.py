"""The unit of streamed work: flat slices of whole CHUNKs, and per-thread buffers for them."""
from __future__ import annotations

import threading

import torch

# elements per streamed chunk: a thread's buffers for it stay in the shared cache (at 1M, DARE's and
# model_stock's did not, and ran slower: docs/benchmarks.md). A constant: random draws are made per chunk
CHUNK = 1 << 19
GPU_CHUNKS = 32  # chunks per slice on a GPU: one chunk's kernels take microseconds, and it waited on the host
_SCRATCH = threading.local()  # per thread: slice-sized buffers reused by map_chunks


def span(device: torch.device) -> int:
    """Elements per slice of streamed work on a device: one chunk on the CPU (it stays in cache),
    GPU_CHUNKS on a GPU. Slices start on chunk boundaries, so per-chunk draws are the same."""
    return CHUNK if device.type == "cpu" else GPU_CHUNKS * CHUNK


def scratch(n: int, dtype: torch.dtype, device: torch.device, role: str = "chunk") -> list[torch.Tensor]:
    """n slice-sized buffers private to this thread (fresh buffers would page-fault every slice);
    callers that may run while a slice's buffers are in use ask for another role."""
    pool = getattr(_SCRATCH, "buffers", None)
    if pool is None:
        pool = _SCRATCH.buffers = {}
    bufs = pool.setdefault((role, dtype, device), [])
    while len(bufs) < n:
        bufs.append(torch.empty(span(device), dtype=dtype, device=device))
    return bufs[:n]
