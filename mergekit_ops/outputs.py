"""Output tensors recycled from one merged tensor to the next of the same size.

A fresh multi-MB buffer is page-faulted and zeroed by the kernel page by page as the merge first
writes it (glibc returns big freed blocks to the kernel): that was the whole output again in
kernel time, for every merge. A model's tensors come in a handful of sizes, so a few buffers
serve them all. On the CPU a buffer also starts where its bytes will sit in the file, modulo a
page, so the writer sends them to the disk without copying them (SequentialFile).
"""
from __future__ import annotations

import weakref

import torch

from .safetensors_io import BLOCK

KEEP_BYTES = 128 * 2**20  # kept buffers plus a fresh one stay under this: the peak (at the biggest tensor) is not raised


class OutputBuffers:
    """Lends flat output buffers and takes them back once written; used by the merge thread only."""

    def __init__(self):
        self.free: dict[tuple, list[torch.UntypedStorage]] = {}  # (bytes, device) -> kept storages
        self.free_bytes = 0
        self.lent = weakref.WeakValueDictionary()  # data pointer -> the buffer lent there, while it lives

    def take(self, numel: int, dtype: torch.dtype, device: torch.device, file_offset: int = 0) -> torch.Tensor:
        """A flat buffer of numel dtype entries; on the CPU its address equals file_offset modulo
        BLOCK (a direct write's alignment) where the dtype's alignment allows."""
        size = _storage_bytes(numel * dtype.itemsize, device)
        if (size, device) in self.free:
            storage = self._pop((size, device))
        else:
            while self.free and self.free_bytes + size > KEEP_BYTES:  # make room
                self._pop(max(self.free, key=lambda k: k[0]))  # the biggest kept
            storage = torch.UntypedStorage(size, device=device)
        skip = (file_offset - storage.data_ptr()) % BLOCK if device.type == "cpu" else 0
        if skip % dtype.itemsize:
            skip = 0
        buf = torch.empty(0, dtype=dtype, device=device).set_(storage, skip // dtype.itemsize, (numel,))
        self.lent[buf.data_ptr()] = buf
        return buf

    def _pop(self, key: tuple) -> torch.UntypedStorage:
        free = self.free[key]
        storage = free.pop()
        if not free:
            del self.free[key]
        self.free_bytes -= storage.nbytes()
        return storage

    def give(self, t: torch.Tensor) -> None:
        """Take back a buffer lent by `take` (or a view of all of it) that nothing will read or
        write again; any other tensor is ignored."""
        buf = self.lent.pop(t.data_ptr(), None)
        if buf is None or (t is not buf and t._base is not buf) or t.numel() != buf.numel():
            return
        storage = buf.untyped_storage()
        if self.free_bytes + storage.nbytes() <= KEEP_BYTES:
            self.free.setdefault((storage.nbytes(), storage.device), []).append(storage)
            self.free_bytes += storage.nbytes()


def _storage_bytes(nbytes: int, device: torch.device) -> int:
    """A buffer's allocation: on the CPU a page more, to start it anywhere in a page."""
    return nbytes + (BLOCK if device.type == "cpu" else 0)
