"""Streaming executor: read the next tensors while merging the current one, write as we go.

Memory is bounded by the inputs of the tensors in flight (a byte budget of read-ahead) plus the
one being merged; output tensors stream straight into pre-planned shard files. The output
directory appears only when complete: everything is written to a temporary sibling first.
"""
from __future__ import annotations

import os
import shutil
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from . import collector
from .checkpoint import Checkpoint
from .devices import is_device_name
from .errors import MergeError
from .files import side_files_bytes, write_side_files
from .lora import input_dirs
from .methods.job import TensorJob
from .outdir import build_in_place, check_out_dir, clean_leftovers, temp_dir
from .outputs import OutputBuffers
from .plan import MergePlan, TensorTask, build_plan
from .recipe import Recipe, load_recipes
from .safetensors_io import ShardWriter, TensorInfo, open_regular, plan_shards, read_tensor, tensor_nbytes
from .transfers import Transfers
from .vocab import align


# While the writer writes a batch, finished tensors wait for it until this many bytes of them do;
# then the merge waits, and they go in one call. A direct write waits for a busy core after each
# call, so with both cores merging small calls take longer per byte; batches of this size made
# merges faster, smaller batches did not (measured: docs/benchmarks.md).
WRITE_BATCH_BYTES = 64 << 20


@dataclass
class MergeOptions:
    """How to run a merge; of these only `seed` and `compute_dtype` change the result (and `device`
    its last bits: a GPU reduces in another order)."""

    device: str = "cpu"
    seed: int = 0
    out_shard_size: int = 5 * 10**9
    allow_pickle: bool = False
    allow_crimes: bool = False
    copy_tokenizer: bool = True
    compute_dtype: torch.dtype = torch.float32
    read_ahead_bytes: int = 256 * 2**20
    progress: Callable[[int, int, int], None] | None = None  # (tensors done, total, bytes written)
    # a dict to fill with the output's weight files' sha256, by file name, hashed as they are written
    # (cleared first; a multi-document recipe leaves the final output's)
    sha256: dict[str, str] | None = None
    pool: Executor | None = None  # set by execute: the merge's worker threads
    draws: Executor | None = None  # set by execute on a GPU: threads for a slice's per-chunk draws
    outputs: OutputBuffers | None = None  # set by execute: output buffers recycled once written


def merge_file(recipe_path: str | Path, out_dir: str | Path, options: MergeOptions | None = None,
               intermediate_dir: str | Path | None = None) -> Path:
    """Run a (possibly multi-document) recipe file; the final document is written to out_dir.

    Named documents are built first, in dependency order, into intermediate_dir/<name> (default: a
    temporary directory beside out_dir, removed afterwards); others name them as models.
    """
    recipes = load_recipes(recipe_path)
    out_dir = Path(out_dir).absolute()
    base_dir = Path(recipe_path).resolve().parent
    if len(recipes) == 1:
        return merge(recipes[0], out_dir, options, base_dir)
    names = {r.name for r in recipes}
    sources = {what: path for r in recipes for ref in r.model_refs() if ref.split("+")[0] not in names
               for what, path in input_dirs(ref, base_dir).items()}
    check_out_dir(out_dir, sources, _places(base_dir))  # before the first document is built
    clean_leftovers(out_dir)
    keep = intermediate_dir is not None
    work = Path(intermediate_dir) if keep else temp_dir(out_dir, "intermediates")
    work.mkdir(parents=True, exist_ok=True)
    try:
        built: dict[str, str] = {}
        for recipe in recipes:
            recipe.rename_models(built)
            target = out_dir if recipe is recipes[-1] else work / recipe.name
            merge(recipe, target, options, base_dir)
            if recipe.name:
                built[recipe.name] = str(target.resolve())
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return out_dir


def merge(recipe: Recipe | str | Path, out_dir: str | Path, options: MergeOptions | None = None,
          base_dir: Path | None = None) -> Path:
    """Merge one recipe into out_dir (replaced atomically). Returns out_dir."""
    if not isinstance(recipe, Recipe):
        return merge_file(recipe, out_dir, options)
    options = options or MergeOptions()
    checkpoints = {ref: Checkpoint.open(ref, base_dir, options.allow_pickle) for ref in recipe.model_refs()}
    plan = build_plan(recipe, checkpoints, options.allow_crimes)
    return execute(plan, Path(out_dir), options, base_dir)


def merge_tensors(recipe: Recipe, options: MergeOptions | None = None, base_dir: Path | None = None,
                  checkpoints: dict[str, Checkpoint] | None = None) -> dict[str, torch.Tensor]:
    """Merge one recipe into tensors in memory, {name: tensor} in the output's order and dtypes: the
    plan, methods and seeds of `merge`, so each equals what `merge` writes bit for bit. For a
    search's trials, which need no files; `checkpoints` (by model reference) saves reopening the
    inputs on every trial. Results stay on the options' device."""
    options = options or MergeOptions()
    device = _device(options.device)
    opened = checkpoints if checkpoints is not None else {}
    for ref in recipe.model_refs():
        if ref not in opened:
            opened[ref] = Checkpoint.open(ref, base_dir, options.allow_pickle)
    plan = build_plan(recipe, {ref: opened[ref] for ref in recipe.model_refs()}, options.allow_crimes)
    reader = _Reader(plan.checkpoints)
    try:
        extras = whole_model_extras(plan, reader.load, device, options)
        out = {}
        with collector.paused(), _workers() as pool, _draw_threads(device) as draws:
            run = replace(options, pool=pool, draws=draws, outputs=None)
            for task in plan.tasks:
                inputs, base = reader.load(task)
                merged = merge_task(plan, task, inputs, base, device, run, extras.get(task.name, {}))
                # a copied tensor is its input's private mapping: own it
                out[task.name] = merged.clone() if task.copy else merged
    finally:
        reader.close()
    return out


def _places(base_dir: Path | None) -> dict[str, Path]:
    """Folders an output may lie in but never be or hold."""
    return {"the working directory": Path.cwd(), **({"the recipe's folder": base_dir} if base_dir else {})}


def execute(plan: MergePlan, out_dir: Path, options: MergeOptions, base_dir: Path | None = None) -> Path:
    """Merge a plan into out_dir (see outdir.py for what it may replace); base_dir: the recipe's folder."""
    device = _device(options.device)
    out_dir = out_dir.absolute()
    inputs = {f"model '{c.ref.split('+')[0] if c.adapter else c.ref}'": c.path for c in plan.checkpoints}
    inputs.update({f"adapter '{c.adapter.ref}'": c.adapter.path for c in plan.checkpoints if c.adapter})
    check_out_dir(out_dir, inputs, _places(base_dir))
    clean_leftovers(out_dir)
    tmp = temp_dir(out_dir)
    writer = ShardWriter(tmp, plan_shards([(t.name, t.out_dtype, t.shape) for t in plan.tasks],
                                          options.out_shard_size), sha256=options.sha256)
    needed = writer.nbytes + side_files_bytes(plan, options.copy_tokenizer)
    if options.sha256 is not None:
        options.sha256.clear()

    def fill() -> None:
        write_side_files(plan, tmp, options.copy_tokenizer)
        reader = _Reader(plan.checkpoints)
        try:
            extras = whole_model_extras(plan, reader.load, device, options)
        finally:
            reader.close()
        # the merge's many small objects would trigger full collections (their cost: docs/benchmarks.md)
        with collector.paused(), _workers() as pool, _draw_threads(device) as draws:
            _run(plan, writer, device, replace(options, pool=pool, draws=draws, outputs=OutputBuffers()), extras)

    build_in_place(out_dir, tmp, writer, needed, fill)
    return out_dir


def whole_model_extras(plan: MergePlan, load: Callable, device: torch.device,
                       options: MergeOptions) -> dict[str, dict]:
    """The method's whole-model pass before any tensor is merged (trim_scope: model), per tensor
    name; {} for methods without one. load(task) gives a task's (inputs, base)."""
    if not plan.recipe.method.prepare:
        return {}
    return plan.recipe.method.prepare(
        plan.tasks, lambda task: _job(plan, task, *load(task), device, options).full(), plan.recipe.source)


def _device(name: str) -> torch.device:
    """Where the math runs: the CPU or a CUDA device torch sees (else an error, before any output)."""
    if not is_device_name(name):
        raise MergeError(f"device {name!r}: use cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"device {name!r} was asked for, but torch sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise MergeError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextmanager
def _workers():
    """A pool of one thread per core for chunk and per-input work, with torch at one thread per op
    meanwhile. Torch's own two-thread ops wait at a barrier for both cores: when another process
    takes one, every op stalls for its time slice (merges slowed badly: docs/benchmarks.md); pool
    threads just take the next chunk. Results never depend on the thread count (see
    TensorJob.map_chunks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # threads created from now on start with one thread per op
    try:
        # ...except in MKL's BLAS calls (torch.dot), which used every core in each worker until
        # the worker set its own count, so a second worker's dot products gained nothing (measured:
        # docs/benchmarks.md), and their rounding depended on the machine's core count
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="mergekit-work",
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _draw_threads(device: torch.device):
    """On a GPU, threads that draw a slice's chunks side by side (numpy lets go of the GIL); the
    CPU's slices are single chunks."""
    if device.type == "cpu":
        yield None
        return
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="mergekit-draw") as draws:
        yield draws


class _Reader:
    """Reads a task's input tensors (mapped, see read_tensor); keeps one descriptor per file open."""

    def __init__(self, checkpoints: list[Checkpoint]):
        self.checkpoints = checkpoints
        self.fds: dict[Path, int] = {}

    def read(self, idx: int, name: str) -> torch.Tensor:
        ckpt = self.checkpoints[idx]
        w = ckpt.read_pickled(name) if ckpt.pickle_state is not None else self.read_info(ckpt.tensors[name])
        return ckpt.adapter.apply(name, w, self.read_info) if ckpt.adapter else w

    def read_info(self, info: TensorInfo) -> torch.Tensor:
        fd = self.fds.get(info.path)
        if fd is None:
            fd = self.fds[info.path] = open_regular(info.path)
        return read_tensor(info, fd)

    def load(self, task: TensorTask) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        inputs = [self.read(i, n) for i, n in task.inputs]
        base = self.read(*task.base) if task.base else None
        return inputs, base

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _task_bytes(plan: MergePlan, task: TensorTask) -> int:
    refs = task.inputs + ([task.base] if task.base else [])
    return sum(plan.checkpoints[i].tensors[n].nbytes for i, n in refs)


def _run(plan: MergePlan, writer: ShardWriter, device: torch.device, options: MergeOptions,
         extras: dict[str, dict]) -> None:
    """Three overlapped steps: a thread reads ahead (within a byte budget) and copies to the
    device, this thread merges, a thread copies back and writes the tensors finished meanwhile as
    one batch (while it writes, up to WRITE_BATCH_BYTES more wait); a fourth frees used inputs (on
    the CPU, unmaps them)."""
    reader = _Reader(plan.checkpoints)
    transfers = Transfers(device)
    pending: deque = deque()
    writing = None  # (future, outputs) of the batch being written
    ready: list = []  # (name, output, event) of finished tensors not yet given to the writer
    ready_bytes = 0
    written = 0
    tasks = plan.tasks
    file_offsets = writer.offsets()
    nxt = 0

    def fetch(task: TensorTask):
        return transfers.upload(*reader.load(task))

    def write(batch: list[tuple[str, torch.Tensor, torch.cuda.Event | None]]) -> None:
        for name, out, event in batch:
            writer.write(name, transfers.download(out, event))
        writer.flush()  # the batch's buffers are handed back after this

    def submit(batch: list) -> tuple:  # (future, outputs), for _finish
        return write_pool.submit(write, batch), [out for _, out, _ in batch]

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="mergekit-read") as reads, \
                ThreadPoolExecutor(1, thread_name_prefix="mergekit-write") as write_pool, \
                ThreadPoolExecutor(1, thread_name_prefix="mergekit-free") as frees:
            for done, task in enumerate(tasks):
                in_flight = sum(b for _, b in pending)
                while nxt < len(tasks) and (nxt == done or in_flight < options.read_ahead_bytes):
                    b = _task_bytes(plan, tasks[nxt])
                    pending.append((reads.submit(fetch, tasks[nxt]), b))
                    in_flight += b
                    nxt += 1
                future, _ = pending.popleft()
                loaded = [transfers.arrive(*future.result())]
                del future
                out = merge_task(plan, task, *loaded[0], device, options, extras.get(task.name, {}),
                                 file_offsets[task.name])
                frees.submit(loaded.clear)  # freeing the inputs (on the CPU, page-table work) off the merge thread
                del loaded
                ready.append((task.name, out, transfers.mark()))
                ready_bytes += out.nbytes
                del out
                if writing and (writing[0].done() or ready_bytes >= WRITE_BATCH_BYTES):
                    _finish(writing, options)
                    writing = None
                if not writing:
                    writing, ready, ready_bytes = submit(ready), [], 0
                written += tensor_nbytes(task.out_dtype, task.shape)
                if options.progress:
                    options.progress(done + 1, len(tasks), written)
            if writing:
                _finish(writing, options)
            if ready:
                _finish(submit(ready), options)
    finally:
        reader.close()


def _finish(batch: tuple, options: MergeOptions) -> None:
    """Wait for a batch's write, then hand its buffers back for the next tensors of their sizes."""
    future, outs = batch
    future.result()
    if options.outputs is not None:
        for out in outs:
            options.outputs.give(out)


def _job(plan: MergePlan, task: TensorTask, inputs: list[torch.Tensor], base: torch.Tensor | None,
         device: torch.device, options: MergeOptions, extra: dict | None = None, file_offset: int = 0) -> TensorJob:
    inputs = [x.to(device) for x in inputs]
    base = base.to(device) if base is not None else None
    if task.vocab:
        inputs, base = _align_vocab(plan, task, inputs, base)
    return TensorJob(name=task.name, tensors=inputs, base=base, model_params=task.model_params,
                     params=task.params, seed=options.seed, extra=extra or {}, compute_dtype=options.compute_dtype,
                     load_dtype=plan.load_dtype, out_dtype=task.out_dtype, pool=options.pool, draws=options.draws,
                     outputs=options.outputs, file_offset=file_offset)


def _align_vocab(plan: MergePlan, task: TensorTask, inputs: list[torch.Tensor],
                 base: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Put every input's token rows in the output vocabulary's order (vocab.py)."""
    refs = [i for i, _ in task.inputs] + ([task.base[0]] if task.base else [])
    base_pos = refs.index(task.base_model) if task.base_model in refs else None
    rules = {}
    for row, rule in plan.vocab.rules.items():
        if rule.model is not None and rule.model not in refs:
            raise MergeError(f"tokenizer.tokens: token {rule.token!r} takes its row from model "
                             f"'{plan.checkpoints[rule.model].ref}', which is not an input of tensor '{task.name}'")
        rules[row] = (None if rule.model is None else refs.index(rule.model), rule.row, rule.force)
    aligned = align(inputs + ([base] if base is not None else []), [plan.vocab.perms[i] for i in refs],
                    base_pos, plan.vocab.rows, rules)
    return (aligned[:-1], aligned[-1]) if base is not None else (aligned, None)


def merge_task(plan: MergePlan, task: TensorTask, inputs: list[torch.Tensor], base: torch.Tensor | None,
               device: torch.device, options: MergeOptions, extra: dict | None = None,
               file_offset: int = 0) -> torch.Tensor:
    """Merge one tensor on the device, check the result is finite, cast it to the output dtype
    (the result stays on the device). file_offset: where the writer will put it (OutputBuffers)."""
    if task.copy:
        first = inputs[0]
        for (idx, _), other in zip(task.inputs[1:], inputs[1:]):
            if not torch.equal(first, other):
                raise MergeError(f"tensor '{task.name}' is not floating point and differs between "
                                 f"'{plan.checkpoints[task.inputs[0][0]].ref}' and '{plan.checkpoints[idx].ref}'")
        return first
    job = _job(plan, task, inputs, base, device, options, extra, file_offset)
    out = plan.recipe.method.merge(job).to(dtype=task.out_dtype)
    if not job.is_finite(out):
        raise MergeError(f"tensor '{task.name}': the merge produced NaN or Inf "
                         f"(method {plan.recipe.method.name}, parameters {task.params}, per model {task.model_params})")
    return out

