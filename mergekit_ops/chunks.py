"""The unit of streamed work: flat chunks of CHUNK elements, and per-thread buffers for them."""
from __future__ import annotations

import threading

import torch

CHUNK = 1 << 20  # elements per streamed chunk: fits in cache. A constant: random draws are made per chunk
_SCRATCH = threading.local()  # per thread: chunk-sized buffers reused by map_chunks


def scratch(n: int, dtype: torch.dtype, device: torch.device, role: str = "chunk") -> list[torch.Tensor]:
    """n chunk-sized buffers private to this thread (fresh buffers would page-fault every chunk);
    callers that may run while a chunk's buffers are in use ask for another role."""
    pool = getattr(_SCRATCH, "buffers", None)
    if pool is None:
        pool = _SCRATCH.buffers = {}
    bufs = pool.setdefault((role, dtype, device), [])
    while len(bufs) < n:
        bufs.append(torch.empty(CHUNK, dtype=dtype, device=device))
    return bufs[:n]
