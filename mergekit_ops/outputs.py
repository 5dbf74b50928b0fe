"""Output tensors recycled from one merged tensor to the next of the same size.

A fresh multi-MB buffer is page-faulted and zeroed by the kernel page by page as the merge first
writes it (glibc returns big freed blocks to the kernel): that was the whole output again in
kernel time, for every merge. A model's tensors come in a handful of sizes, so a few buffers
serve them all.
"""
from __future__ import annotations

import weakref

import torch

KEEP_BYTES = 128 * 2**20  # kept buffers plus a fresh one stay under this: the peak (at the biggest tensor) is not raised


class OutputBuffers:
    """Lends flat output buffers and takes them back once written; used by the merge thread only."""

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.free_bytes = 0
        self.lent = weakref.WeakValueDictionary()  # data pointer -> the buffer lent there, while it lives

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (numel, dtype, device)
        if key not in self.free:
            while self.free and self.free_bytes + numel * dtype.itemsize > KEEP_BYTES:  # make room
                self._pop(max(self.free, key=lambda k: k[0] * k[1].itemsize))  # the biggest kept
            buf = torch.empty(numel, dtype=dtype, device=device)
        else:
            buf = self._pop(key)
        self.lent[buf.data_ptr()] = buf
        return buf

    def _pop(self, key: tuple) -> torch.Tensor:
        free = self.free[key]
        buf = free.pop()
        if not free:
            del self.free[key]
        self.free_bytes -= buf.nbytes
        return buf

    def give(self, t: torch.Tensor) -> None:
        """Take back a buffer lent by `take` (or a view of it) that nothing will read or write
        again; any other tensor is ignored."""
        buf = self.lent.pop(t.data_ptr(), None)
        if buf is None or (t is not buf and t._base is not buf):
            return
        if self.free_bytes + buf.nbytes <= KEEP_BYTES:
            self.free.setdefault((buf.numel(), buf.dtype, buf.device), []).append(buf)
            self.free_bytes += buf.nbytes
