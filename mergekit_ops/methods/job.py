"""What a merge method receives per tensor: its inputs, parameters, and the chunked passes over them."""
from __future__ import annotations

import hashlib
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..chunks import CHUNK, scratch, span
from ..finite import all_finite, part_is_finite
from ..outputs import OutputBuffers


def _totals(parts: list[list[float]], n: int) -> list[float]:
    """The n totals of per-slice partial sums, added in slice order."""
    totals = [0.0] * n
    for part in parts:
        totals = [t + p for t, p in zip(totals, part)]
    return totals


@dataclass
class TensorJob:
    """One output tensor's inputs, as read (on the device, in their stored dtype), and parameters.

    Whole-tensor methods call `full()` for compute-dtype copies; streaming methods work through
    `map_chunks()` (or `weighted_sum`, `map_deltas`), which convert one flat slice at a time (a
    cache-sized chunk on the CPU, chunks.span), slices side by side on the pool (less memory, fewer
    passes over RAM).
    """

    name: str
    tensors: list[torch.Tensor]  # the non-base inputs, recipe order
    base: torch.Tensor | None
    model_params: list[dict[str, Any]]  # one dict per entry of `tensors`
    params: dict[str, Any]
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # whole-model statistics (trim_scope: model)
    compute_dtype: torch.dtype = torch.float32
    load_dtype: torch.dtype | None = None  # the recipe's dtype: inputs are rounded to it first
    out_dtype: torch.dtype = torch.float32  # streaming methods write their output in this dtype
    pool: Executor | None = None  # runs map_chunks' and per-input work side by side; None: in order here
    draws: Executor | None = None  # on a GPU: a slice's per-chunk draws side by side (the pool runs slices)
    outputs: OutputBuffers | None = None  # recycled output buffers; None: fresh ones
    file_offset: int = 0  # where the output's bytes go in their file: a buffer aligned as they are is not copied
    _output: torch.Tensor | None = field(default=None, init=False, repr=False)  # empty_output's buffer
    _stored: list[tuple[int, bool]] = field(default_factory=list, init=False, repr=False)  # store's (size, finite)

    @property
    def shape(self) -> torch.Size:
        return (self.base if self.base is not None else self.tensors[0]).shape

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return (self.base if self.base is not None else self.tensors[0]).device

    def convert(self, x: torch.Tensor) -> torch.Tensor:
        if self.load_dtype is not None:
            x = x.to(self.load_dtype)
        return x.to(self.compute_dtype)

    def full(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """All inputs in the compute dtype, whole."""
        base = self.convert(self.base) if self.base is not None else None
        return [self.convert(x) for x in self.tensors], base

    def map(self, fn: Callable, items) -> list:
        """fn over items on the pool (or in order here); results in item order."""
        return list(self.pool.map(fn, items) if self.pool is not None else map(fn, items))

    def map_slices(self, fn: Callable[[slice], Any]) -> list:
        """fn(flat slice) for every slice (a chunk on the CPU, see chunks.span), on the pool;
        results in slice order."""
        step = span(self.device)
        return self.map(lambda start: fn(slice(start, min(start + step, self.numel))), range(0, self.numel, step))

    def map_chunks(self, fn: Callable[[slice, list[torch.Tensor], torch.Tensor | None], Any]) -> list:
        """fn(flat slice, inputs, base) for every slice, on the pool, in the compute dtype (scratch
        buffers, free to modify): fn must not depend on the order (write its own slice of the
        output, return partial sums). Returns fn's results in slice order, so sums of them do not
        depend on the schedule."""
        sources = [x.reshape(-1) for x in self.tensors] + ([self.base.reshape(-1)] if self.base is not None else [])

        def run(sl: slice):
            bufs = scratch(len(sources), self.compute_dtype, sources[0].device)
            views = [self._fill(buf[:sl.stop - sl.start], x[sl]) for buf, x in zip(bufs, sources)]
            return fn(sl, views, None) if self.base is None else fn(sl, views[:-1], views[-1])
        return self.map_slices(run)

    def sum_chunks(self, fn: Callable[[slice, list[torch.Tensor], torch.Tensor | None], list[float]],
                   n: int) -> list[float]:
        """Totals of the n partial sums fn returns per slice (map_chunks), added in slice order as
        one pass would add them, so they do not depend on the schedule."""
        return _totals(self.map_chunks(fn), n)

    def sum_deltas(self, inputs: list[int], fn: Callable[[slice, int, torch.Tensor], list[float]],
                   n: int) -> list[float]:
        """Totals of the n partial sums fn(flat slice, i, input i minus base) returns (map_deltas),
        n for each i of inputs, in that order; added in slice order (sum_chunks)."""
        return _totals([[v for sums in part for v in sums] for part in self.map_deltas(inputs, fn)],
                       n * len(inputs))

    def weighted_sum(self, weights: list[float], base_weight: float = 0.0) -> torch.Tensor:
        """sum_i weights[i] * input_i + base_weight * base, in the output dtype, shaped.

        Per chunk, each input is converted into one reused buffer (it stays in cache) and added:
        a merge's time is proportional to its passes over memory, and methods linear in their
        inputs need no more. A zero base_weight leaves the base unread.
        """
        out = self.empty_output()
        terms, coefs = [x.reshape(-1) for x in self.tensors], list(weights)
        if base_weight != 0 and self.base is not None:
            terms.append(self.base.reshape(-1))
            coefs.append(base_weight)

        def merge_chunk(sl: slice) -> None:
            acc, tmp = (buf[:sl.stop - sl.start] for buf in scratch(2, self.compute_dtype, out.device))
            self._fill(acc, terms[0][sl]).mul_(coefs[0])
            for c, x in zip(coefs[1:], terms[1:]):
                acc.add_(self._fill(tmp, x[sl]), alpha=c)
            self.store(out, sl, acc)
        self.map_slices(merge_chunk)
        return out.view(self.shape)

    def map_deltas(self, inputs: list[int], fn: Callable[[slice, int, torch.Tensor], Any]) -> list[list]:
        """[fn(flat slice, i, input i minus base) for i in inputs] for every slice, on the pool, in
        slice order; the delta is in the compute dtype, in a scratch buffer free to modify. Per
        slice the base is converted once and each input's delta in turn into one buffer: with a
        buffer per input, as in map_chunks, a slice's buffers fell out of cache and DARE's norm
        pass was slower (measured: docs/benchmarks.md)."""
        xs, base = [self.tensors[i].reshape(-1) for i in inputs], self.base.reshape(-1)

        def run(sl: slice) -> list:
            base_buf, buf = (b[:sl.stop - sl.start] for b in scratch(2, self.compute_dtype, base.device))
            self._fill(base_buf, base[sl])
            return [fn(sl, i, self._fill(buf, x[sl]).sub_(base_buf)) for i, x in zip(inputs, xs)]
        return self.map_slices(run)

    def _fill(self, buf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return buf.copy_(x.to(self.load_dtype) if self.load_dtype is not None else x)

    def empty_output(self) -> torch.Tensor:
        """A flat output buffer that streaming methods fill slice by slice, through `store`."""
        if self.outputs is not None:
            self._output = self.outputs.take(self.numel, self.out_dtype, self.device, self.file_offset)
        else:
            self._output = torch.empty(self.numel, dtype=self.out_dtype, device=self.device)
        return self._output

    def store(self, out: torch.Tensor, sl: slice, value: torch.Tensor) -> None:
        """out[sl] = value (out from empty_output), then, on the CPU, a NaN/Inf check of that
        slice while it is in cache: a pass over the whole output afterwards read it back from
        memory, a sizeable share of a linear merge's time (measured: docs/benchmarks.md)."""
        out[sl] = value
        if out.device.type == "cpu":
            self._stored.append((sl.stop - sl.start, part_is_finite(out[sl])))

    def is_finite(self, out: torch.Tensor) -> bool:
        """No NaN or Inf in out, the merged tensor in its output dtype: by the checks `store` made
        when it wrote every element of out, else by a pass over it."""
        streamed = self._output
        if (streamed is not None and out.data_ptr() == streamed.data_ptr() and out.dtype == streamed.dtype
                and sum(n for n, _ in self._stored) == self.numel):
            return all(ok for _, ok in self._stored)
        return all_finite(out, self.pool)

    def stream_seed(self, index: int, chunk: int | None = None) -> int:
        """The seed private to (seed, tensor, input[, chunk]): random draws never depend on
        scheduling, and per-chunk streams let chunks draw side by side."""
        key = f"{self.seed}\0{self.name}\0{index}" + (f"\0{chunk}" if chunk is not None else "")
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)

    def generator(self, index: int) -> torch.Generator:
        """torch's CPU generator for input `index` of this tensor (whole-tensor draws). On the CPU
        for every device: CUDA's generator is another algorithm, and a merge on a GPU must keep
        the same entries as on the CPU."""
        gen = torch.Generator()
        gen.manual_seed(self.stream_seed(index))
        return gen

    def slice_words(self, index: int, sl: slice) -> torch.Tensor:
        """random_words of every chunk of a slice, in order, on the CPU. A slice is whole chunks;
        only a tensor's last chunk may be short, so its spare words come last."""
        assert sl.start % CHUNK == 0, f"slice {sl} does not start on a chunk: it would repeat a chunk's draws"
        chunks = range(sl.start // CHUNK, -(-sl.stop // CHUNK))

        def draw(c: int) -> torch.Tensor:
            return self.random_words(index, c, (min(CHUNK, sl.stop - c * CHUNK) + 3) // 4)
        several = self.draws is not None and len(chunks) > 1
        words = list(self.draws.map(draw, chunks) if several else map(draw, chunks))
        return words[0] if len(words) == 1 else torch.cat(words)

    def random_words(self, index: int, chunk: int, n: int) -> torch.Tensor:
        """n uniform 64-bit words (as int64, on the CPU) of the (seed, tensor, input, chunk)
        stream: numpy's SFC64 seeded through SeedSequence, a stream numpy keeps stable across
        versions and platforms. It is faster than torch's mt19937 here (measured:
        docs/benchmarks.md), and draws without holding the GIL.
        (Full-range `integers` is the raw stream; a test holds it to `random_raw`.)"""
        rng = np.random.Generator(np.random.SFC64(self.stream_seed(index, chunk)))
        words = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
        return torch.from_numpy(words.view(np.int64))
