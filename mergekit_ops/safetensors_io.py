"""Header-level safetensors access.

We parse the (tiny, stable) safetensors header ourselves and map each tensor on its own,
for as long as it is in flight, instead of mapping whole files: mapped pages of multi-GB inputs
would otherwise stay resident and count against peak memory. Writing plans every shard's header before any
tensor exists, so tensors stream straight to disk and no shard buffer is held.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
FAULT_AROUND = 64 * 1024  # bytes of page cache Linux maps around a read fault (its fault_around_bytes default)
O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none: buffered writes
BLOCK = 4096  # O_DIRECT alignment of offsets, lengths and buffers
STAGE_BYTES = 8 << 20  # page-aligned staging buffer for direct writes
DIRECT_MIN_BYTES = 1 << 20  # smaller data is copied into the stage: a write call each costs more
IOV_MAX = max(16, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 16  # buffers per writev (POSIX: >= 16)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk and what it is."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int


def open_regular(path: Path) -> int:
    """A read descriptor of a regular file. Opened without blocking, then checked: a FIFO or a
    device named like a weight file would otherwise hang the open or the read forever."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file")
    return fd


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Return (tensor infos by name, __metadata__) of one .safetensors file without reading data.

    The header comes from whoever made the file, so all of it is checked before any offset is
    used: a JSON object of entries with a known dtype, integral shape and offsets, each tensor's
    bytes = its shape x its dtype's size, inside the data section and overlapping no other tensor.
    Nothing larger than the file is allocated, whatever sizes the header claims."""
    fd = open_regular(path)
    try:
        file_size = os.fstat(fd).st_size
        raw = os.pread(fd, 8, 0)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > min(MAX_HEADER_BYTES, file_size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header size {size}, file size {file_size})")
        blob = bytearray(size)
        _pread_into(fd, memoryview(blob), 8, f"{path}: unexpected end of file in the safetensors header")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read safetensors header: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        header = json.loads(blob, object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors header: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: the safetensors header's __metadata__ is not an object")
    data_start, data_size = 8 + size, file_size - 8 - size
    infos = {name: _tensor_info(path, name, entry, data_start, data_size) for name, entry in header.items()}
    spans = sorted(infos.values(), key=lambda i: (i.offset, i.offset + i.nbytes))
    for before, after in zip(spans, spans[1:]):
        if after.offset < before.offset + before.nbytes:
            raise CheckpointError(f"{path}: tensors '{before.name}' and '{after.name}' overlap in the file")
    return infos, metadata


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _tensor_info(path: Path, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    """One header entry, checked whole (see read_header)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor '{name}': {what} (header entry {str(entry)[:200]})")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise bad("an entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise bad("the shape is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
        raise bad("data_offsets is not [begin, end] in integers")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise bad(f"bytes {begin}-{end} lie outside the data section of {data_size} bytes (truncated download?)")
    want = tensor_nbytes(DTYPES[dtype], tuple(shape))
    if end - begin != want:
        raise bad(f"{end - begin} bytes, but shape {shape} of {dtype} takes {want}")
    return TensorInfo(name, DTYPES[dtype], tuple(shape), Path(path), data_start + begin, end - begin)


def _natural(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_tensor(info: TensorInfo, fd: int | None = None) -> torch.Tensor:
    """One tensor, backed by a private mapping of its bytes, populated up front.

    The page-cache pages are mapped, not copied: copying (and zeroing fresh pages to copy into)
    was a fifth of a linear merge's CPU time. The mapping is private (copy-on-write), so a method
    may modify its input without touching the file, and it is unmapped when the tensor is freed,
    so only the tensors in flight count against memory. Falls back to a positioned read where
    mapping is refused or the tensor's offset does not suit its dtype.
    """
    own = fd is None
    if own:
        fd = open_regular(info.path)
    try:
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        skip = info.offset - start
        if info.nbytes and skip % _itemsize(info.dtype) == 0:
            try:
                mapping = mmap.mmap(fd, skip + info.nbytes, flags=mmap.MAP_PRIVATE,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
                data = torch.frombuffer(mapping, dtype=torch.uint8, count=info.nbytes, offset=skip)
                _populate(data)
                return data.view(info.dtype).reshape(info.shape)
            except (OSError, ValueError):
                pass
        return _pread_tensor(info, fd)
    finally:
        if own:
            os.close(fd)


def _populate(data: torch.Tensor) -> None:
    """Map the pages now, on the read-ahead thread, for reading: a read every FAULT_AROUND bytes
    (and of the last byte), each of whose faults maps the cached pages around it. Less CPU than
    MADV_POPULATE_READ, which walks the pages one by one (measured: docs/benchmarks.md); torch lets
    go of the GIL meanwhile. A page left unmapped (a smaller fault-around) is mapped when first read."""
    data[::FAULT_AROUND].sum()  # the reads are the point: the sums are thrown away
    data[-1:].sum()


def _pread_tensor(info: TensorInfo, fd: int) -> torch.Tensor:
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    _pread_into(fd, memoryview(buf.numpy()), info.offset, f"{info.path}: unexpected end of file reading '{info.name}'")
    return buf.view(info.dtype).reshape(info.shape)


def _pread_into(fd: int, view: memoryview, offset: int, short: str) -> None:
    """Fill view from the file at offset, however many reads it takes; CheckpointError(short) at
    the end of the file."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(short)
        done += n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class ShardPlan:
    """One output file: its name and the tensors in it, in write order."""

    filename: str
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]

    def data_offsets(self) -> dict[str, tuple[int, int]]:
        """Each tensor's (begin, end) in the data section, in write order."""
        spans, offset = {}, 0
        for name, dtype, shape in self.tensors:
            spans[name] = (offset, offset + tensor_nbytes(dtype, shape))
            offset = spans[name][1]
        return spans

    def header_bytes(self, metadata: dict[str, str]) -> bytes:
        header: dict = {"__metadata__": metadata}
        spans = self.data_offsets()
        for name, dtype, shape in self.tensors:
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": list(spans[name])}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data section aligned to 8 bytes, as the reference writer does
        return struct.pack("<Q", len(blob)) + blob

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(d, s) for _, d, s in self.tensors)


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = _itemsize(dtype)
    for d in shape:
        n *= d
    return n


def plan_shards(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[ShardPlan]:
    """Split tensors (in order) into files of at most max_bytes each (a bigger tensor gets its own)."""
    groups: list[list] = [[]]
    size = 0
    for item in tensors:
        n = tensor_nbytes(item[1], item[2])
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    if len(groups) == 1:
        return [ShardPlan("model.safetensors", groups[0])]
    total = len(groups)
    return [ShardPlan(f"model-{i + 1:05d}-of-{total:05d}.safetensors", g) for i, g in enumerate(groups)]


class ShardWriter:
    """Streams tensors, in the planned order, into pre-planned shard files; with `sha256` (a dict),
    records each finished file's sha256 there by file name, hashed as written (the files are
    written with O_DIRECT, so hashing them afterwards would read them back from disk). A tensor
    given to write() may be read until the next flush() or close()."""

    def __init__(self, out_dir: Path, shards: list[ShardPlan], metadata: dict[str, str] | None = None,
                 sha256: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.shards = shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(s, name, dtype, shape) for s in shards for name, dtype, shape in s.tensors]
        self._headers = {s.filename: s.header_bytes(self.metadata) for s in shards}
        self._pos = 0
        self._file = None
        self._shard = None
        self.sha256, self._hash = sha256, None

    @property
    def nbytes(self) -> int:
        """The size of the weight files once written (index left out)."""
        return sum(len(self._headers[s.filename]) + s.nbytes for s in self.shards)

    def offsets(self) -> dict[str, int]:
        """Each tensor's byte offset in its file (header included)."""
        return {name: len(self._headers[shard.filename]) + begin
                for shard in self.shards for name, (begin, _) in shard.data_offsets().items()}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, want, dtype, shape = self._order[self._pos]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"writer expected {want} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if shard is not self._shard:
            self._close_file()
            self._shard = shard
            self._file = SequentialFile(self.out_dir / shard.filename)
            self._hash = hashlib.sha256() if self.sha256 is not None else None
            self._put(memoryview(self._headers[shard.filename]))
        self._put(memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._pos += 1

    def _put(self, data: memoryview) -> None:
        self._file.write(data)
        if self._hash is not None:
            self._hash.update(data)  # releases the GIL for large buffers

    def flush(self) -> None:
        """Send everything written so far to the file: the tensors given to write() may change after."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._pos != len(self._order):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._order)} tensors")
        self._close_file()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {name: s.filename for s in self.shards for name, _, _ in s.tensors},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.discard()
            self._file = None

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            if self._hash is not None:
                self.sha256[self._shard.filename] = self._hash.hexdigest()


class SequentialFile:
    """A file written front to back, with O_DIRECT where the filesystem takes it.

    Buffered writes of a multi-GB output into fresh page-cache pages cost more CPU than a linear
    merge itself on the VMs we measured, and varied widely; direct writes cost little CPU at disk
    speed (measured: docs/benchmarks.md). Bytes pass through a page-aligned staging buffer, except
    the whole blocks of data whose memory is aligned as its place in the file is; every write starts
    and ends on a block, so the last partial block is padded, written, and the file truncated to its
    true size.
    Whole blocks wait for flush() (or a full stage, or close()) and then go in one writev: the
    engine flushes once per batch of tensors (engine.WRITE_BATCH_BYTES).
    """

    def __init__(self, path: Path):
        self.path, self.size, self.fill = path, 0, 0
        self.stage: mmap.mmap | None = None
        self.sent = 0  # stage bytes before this are queued in `pending`
        self.pending: list[memoryview] = []  # whole blocks to write, in file order, at flush()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        if O_DIRECT:
            try:
                self.fd = os.open(path, flags | O_DIRECT, 0o666)
            except OSError:
                pass
            else:
                self.stage = mmap.mmap(-1, STAGE_BYTES)
                return
        self.fd = os.open(path, flags, 0o666)

    def write(self, data: memoryview) -> None:
        """Append data; its whole blocks may wait for flush() (data must stay unchanged until then).
        Where data's address matches its file offset modulo BLOCK (see OutputBuffers), its whole
        blocks go to the disk straight from its memory: copying every byte through the stage cost a
        sizeable share of a linear merge's CPU time (measured: docs/benchmarks.md)."""
        self.size += len(data)
        if self.stage is None:
            _write_all(self.fd, data)
            return
        head = -self.fill % BLOCK  # bytes that complete the staged block
        if len(data) >= head + DIRECT_MIN_BYTES and (_address(data) + head) % BLOCK == 0:
            self._stage(data[:head])
            body = (len(data) - head) // BLOCK * BLOCK
            self._queue(self.fill)
            self.pending.append(data[head:head + body])
            data = data[head + body:]
        self._stage(data)

    def flush(self) -> None:
        """Write every whole block written so far, in one call where the kernel allows."""
        if self.stage is None:
            return
        whole = self.fill - self.fill % BLOCK
        self._queue(whole)
        _write_all(self.fd, *self.pending)
        self.pending.clear()
        # the partial block goes to the stage's start (bytes may overlap: a slice assignment copies)
        self.stage[:self.fill - whole] = self.stage[whole:self.fill]
        self.fill -= whole
        self.sent = 0

    def _queue(self, upto: int) -> None:
        if upto > self.sent:
            self.pending.append(memoryview(self.stage)[self.sent:upto])
            self.sent = upto

    def _stage(self, data: memoryview) -> None:
        while len(data):
            k = min(len(data), STAGE_BYTES - self.fill)
            self.stage[self.fill:self.fill + k] = data[:k]
            self.fill, data = self.fill + k, data[k:]
            if self.fill == STAGE_BYTES:
                self.flush()

    def close(self) -> None:
        """Write what is pending and staged and close: the file is complete."""
        try:
            if self.stage is not None:
                padded = -(-self.fill // BLOCK) * BLOCK
                self.stage[self.fill:padded] = bytes(padded - self.fill)
                self.fill = padded
                self.flush()
                os.ftruncate(self.fd, self.size)
        finally:
            self.discard()

    def discard(self) -> None:
        """Close without writing what is staged (after a failure: the file is thrown away). The
        staging buffer is left to the garbage collector: a failed write's traceback may still hold
        views of it, and closing an exported mmap raises."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd, self.stage = None, None
            self.pending = []


def _address(data: memoryview) -> int:
    return np.frombuffer(data, dtype=np.uint8).ctypes.data


def _write_all(fd: int, *parts: memoryview) -> None:
    """Write the parts, in order, in as few calls as the kernel allows."""
    parts = [p for p in parts if len(p)]
    while parts:
        done = os.writev(fd, parts[:IOV_MAX]) if len(parts) > 1 else os.write(fd, parts[0])
        while parts and done >= len(parts[0]):
            done -= len(parts[0])
            parts.pop(0)
        if parts:
            parts[0] = parts[0][done:]
