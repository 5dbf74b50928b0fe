"""Header-level safetensors access.

We parse the (tiny, stable) safetensors header ourselves and read tensor bytes with
positioned reads instead of mmap: mapped pages of multi-GB inputs would otherwise stay
resident and count against peak memory. Writing plans every shard's header before any
tensor exists, so tensors stream straight to disk and no shard buffer is held.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk and what it is."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Return (tensor infos by name, __metadata__) of one .safetensors file without reading data."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: not a safetensors file (header size {size})")
            header = json.loads(f.read(size))
            file_size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors header: {exc}") from exc
    metadata = header.pop("__metadata__", None) or {}
    infos = {}
    data_start = 8 + size
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor '{name}' has an unsupported header entry {entry}") from exc
        if data_start + end > file_size or begin > end:
            raise CheckpointError(f"{path}: tensor '{name}' lies outside the file (truncated download?)")
        infos[name] = TensorInfo(name, dtype, shape, Path(path), data_start + begin, end - begin)
    return infos, metadata


def read_tensor(info: TensorInfo, fd: int | None = None, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor into private memory (never a view of a mapping); `buf` (uint8, nbytes) to reuse."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8) if buf is None else buf
    view = memoryview(buf.numpy())
    own = fd is None
    if own:
        fd = os.open(info.path, os.O_RDONLY)
    try:
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done:]], info.offset + done)
            if n <= 0:
                raise CheckpointError(f"{info.path}: unexpected end of file reading '{info.name}'")
            done += n
    finally:
        if own:
            os.close(fd)
    return buf.view(info.dtype).reshape(info.shape)


@dataclass
class ShardPlan:
    """One output file: its name and the tensors in it, in write order."""

    filename: str
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]

    def header_bytes(self, metadata: dict[str, str]) -> bytes:
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in self.tensors:
            n = tensor_nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data section aligned to 8 bytes, as the reference writer does
        return struct.pack("<Q", len(blob)) + blob

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(d, s) for _, d, s in self.tensors)


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
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
    """Streams tensors, in the planned order, into pre-planned shard files."""

    def __init__(self, out_dir: Path, shards: list[ShardPlan], metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.shards = shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(s, name, dtype, shape) for s in shards for name, dtype, shape in s.tensors]
        self._pos = 0
        self._file = None
        self._shard = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, want, dtype, shape = self._order[self._pos]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"writer expected {want} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if shard is not self._shard:
            self._close_file()
            self._shard = shard
            self._file = open(self.out_dir / shard.filename, "wb")
            self._file.write(shard.header_bytes(self.metadata))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._pos += 1

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
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
