"""CLI: python -m mergekit_ops RECIPE.yml OUT_DIR — a drop-in for `mergekit-yaml`."""
from __future__ import annotations

import argparse
import gc
import os
import re
import sys

from . import collector

SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12,
              "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '2GiB', '5B' (mergekit's 'B' = billion) or a plain number."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


class ListMethods(argparse.Action):
    """--list-methods: every method with its base-model contract and parameters, then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from .methods import METHODS
        from .methods.base import REQUIRED

        def fmt(params):
            return ", ".join(p.name + ("" if p.default is REQUIRED else f"={p.default}") for p in params) or "-"

        try:
            for m in sorted(METHODS.values(), key=lambda m: m.name):
                print(f"{m.name}: {m.doc}\n    base model: {m.base}; parameters: {fmt(m.params)}; "
                      f"per model: {fmt(m.model_params)}")
            sys.stdout.flush()
        except BrokenPipeError:  # a reader that stopped early (`| head`) is not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush goes nowhere
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mergekit_ops" if sys.argv[0].endswith("__main__.py") else "mergekit-ops",
        description="Merge safetensors checkpoints as a mergekit YAML recipe describes. "
                    "Multi-document recipes build every named document first; the last (or unnamed) one "
                    "is written to OUT_DIR.")
    p.add_argument("--list-methods", action=ListMethods, help="list the merge methods and their parameters")
    p.add_argument("recipe", metavar="RECIPE.yml", help="a mergekit YAML recipe (one document, or several)")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="where the merged model goes: a new or empty folder, or an earlier output of this tool")
    p.add_argument("--device", default="cpu", help="where the math runs: cpu (default), cuda or cuda:N")
    p.add_argument("--cuda", action="store_const", const="cuda", dest="device", help="same as --device cuda")
    p.add_argument("--seed", "--random-seed", type=int, default=0,
                   help="seed of the random methods (dare_*, della*); default 0")
    p.add_argument("--out-shard-size", type=parse_size, default="5GB", help="maximum bytes per output file")
    p.add_argument("--compute-dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32",
                   help="dtype of the arithmetic (inputs are first rounded to the recipe's dtype)")
    p.add_argument("--allow-crimes", action="store_true", help="merge models of different architectures")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read .bin/.pt weights (torch.load with weights_only=True); refused by default")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false")
    p.add_argument("--intermediate-dir", help="keep the outputs of earlier documents of a multi-document recipe here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def keep_freed_memory() -> None:
    """glibc hands freed blocks above 128 KiB straight back to the kernel, so every tensor buffer
    is faulted in afresh, and page faults take a large share of the CPU time (measured:
    docs/benchmarks.md). Keep up to 256 MiB for reuse."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 2**20)
    libc.mallopt(m_trim_threshold, 256 * 2**20)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    # Idle OpenMP workers otherwise spin for the CPU that our read and write threads need
    # (and, on a busy machine, that other processes need): a large slowdown under contention
    # (measured: docs/benchmarks.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # numpy's OpenBLAS (loaded with torch; we never call it) starts a thread per core, and they
    # spin on CPU the merge needs, for no work (measured: docs/benchmarks.md).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Importing torch makes a great many objects: collections during the import walk them, and the
    # first ones after it walk them all again (costs: docs/benchmarks.md). Frozen, no collection
    # visits them.
    with collector.paused():
        import torch

        from .engine import MergeOptions, merge_file
        from .progress import progress_bar
        gc.freeze()

    with progress_bar(not args.quiet) as bar:
        options = MergeOptions(
            device=args.device, seed=args.seed, out_shard_size=args.out_shard_size,
            compute_dtype=getattr(torch, args.compute_dtype), allow_crimes=args.allow_crimes,
            allow_pickle=args.allow_pickle, copy_tokenizer=args.copy_tokenizer, progress=bar,
        )
        code, out = guarded(lambda: merge_file(args.recipe, args.out_dir, options, args.intermediate_dir),
                            args.out_dir)
    if code == 0 and not args.quiet:
        print(f"merged model written to {out}", file=sys.stderr)
    return code


def guarded(work, out_dir: str) -> tuple[int, object]:
    """(0, work()); or, when the input is at fault or the user interrupts, one line on stderr and
    (exit code, None)."""
    from .errors import MergeError

    try:
        return 0, work()
    except (MergeError, OSError) as exc:  # an OSError names its file
        print(f"error: {exc}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print(f"interrupted: {out_dir} is as it was before", file=sys.stderr)
        return 130, None


def leave(code: int) -> None:
    """Exit once the output is complete and closed, without the interpreter's teardown: unloading
    torch after a merge takes a noticeable share of its time (measured: docs/benchmarks.md) and does
    nothing for anyone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli() -> None:
    """The `mergekit-ops` command."""
    leave(main())


if __name__ == "__main__":
    cli()
