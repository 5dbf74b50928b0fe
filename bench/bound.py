"""What a merge with this engine cannot go below on this machine, beside bench_merge.py's floor.

For each method, on bench_merge.py's checkpoints and recipes (built first if missing):
  * import: Python start-up and `import torch`, exiting at once as the CLI does (min of 3);
  * compute: the engine merging every tensor with all inputs already mapped and nothing written
    (a fresh process; min of --repeat runs after a warm-up run);
  * disk: writing an output-sized file through the engine's O_DIRECT writer (min of 2);
  * bound: import + max(compute, disk): the CLI's time if reading, writing and the pipeline
    between them cost nothing beyond the longer of the two;
next to the floor as bench_merge.py measures it (the inputs read once plus a buffered write), and
import + disk alone over the floor: what no tool that imports torch and writes to this disk beats.

    python bench/bound.py [--methods linear,model_stock] [--repeat 3] [--workdir bench/work]
"""
from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import make_checkpoints  # noqa: E402
import yaml  # noqa: E402
from bench_merge import (DEFAULT_METHODS, dir_bytes, model_files, read_files, recipe, recipe_inputs,  # noqa: E402
                         settle, write_file)

TARGETS = {"linear": 3, "slerp": 3, "task_arithmetic": 3, "model_stock": 3, "dare_ties": 10}  # x the floor


def compute_seconds(yml: str, repeat: int) -> float:
    """The engine's merge of every tensor of a recipe, inputs mapped beforehand, outputs recycled
    unwritten; the best of `repeat` runs after one that warms the buffers."""
    import torch

    from mergekit_ops import collector, engine
    from mergekit_ops.checkpoint import Checkpoint
    from mergekit_ops.outputs import OutputBuffers
    from mergekit_ops.plan import build_plan
    from mergekit_ops.recipe import load_recipes

    recipe_ = load_recipes(yml)[0]
    plan = build_plan(recipe_, {ref: Checkpoint.open(ref) for ref in recipe_.model_refs()}, False)
    reader = engine._Reader(plan.checkpoints)
    loaded = dict(zip((task.name for task in plan.tasks), (reader.load(task) for task in plan.tasks)))
    cpu = torch.device("cpu")
    best = float("inf")
    with collector.paused(), engine._workers() as pool:
        options = engine.MergeOptions(pool=pool, outputs=OutputBuffers())
        for run in range(repeat + 1):
            t0 = time.perf_counter()
            extras = engine.whole_model_extras(plan, lambda task: loaded[task.name], cpu, options)
            for task in plan.tasks:
                out = engine.merge_task(plan, task, *loaded[task.name], cpu, options, extras.get(task.name, {}))
                options.outputs.give(out)
            if run:
                best = min(best, time.perf_counter() - t0)
    reader.close()
    return best


def direct_write_seconds(path: str, nbytes: int) -> float:
    """Write nbytes through the engine's writer, a 64 MB batch per call, as the engine batches."""
    from mergekit_ops.safetensors_io import SequentialFile

    block = 64 << 20
    buf = mmap.mmap(-1, block)  # page-aligned, so whole blocks go to the disk uncopied
    buf.write(os.urandom(block))
    view = memoryview(buf)
    t0 = time.perf_counter()
    out = SequentialFile(Path(path))
    if out.stage is None:
        raise SystemExit(f"{path}: the filesystem refuses O_DIRECT; the disk bound would be a page-cache fill")
    left = nbytes
    while left > 0:
        out.write(view[:min(left, block)])
        out.flush()
        left -= block
    out.close()
    return time.perf_counter() - t0


def best_of(n: int, fn) -> float:
    return min(fn() for _ in range(n))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(make_checkpoints.SIZES), default="default")
    p.add_argument("--dtype", choices=sorted(make_checkpoints.DTYPES), default="bfloat16")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=os.path.join(HERE, "work"))
    p.add_argument("--compute", metavar="RECIPE.yml", help=argparse.SUPPRESS)  # the child's job
    a = p.parse_args(argv)
    if a.compute:
        print(compute_seconds(a.compute, a.repeat))
        return 0

    work = os.path.abspath(a.workdir)
    models = make_checkpoints.build(os.path.join(work, f"ckpt-{a.size}-{a.dtype}"), a.size, a.dtype, 3, 0)
    files = {m: [f for f in model_files(m) if f.endswith(".safetensors")] for m in models}
    out_bytes = dir_bytes(models[0])
    recipes_dir = os.path.join(work, "recipes", f"{a.size}-{a.dtype}")
    os.makedirs(recipes_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run_seconds(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        return time.perf_counter() - t0

    imports = best_of(3, lambda: run_seconds([sys.executable, "-c", "import os, torch; os._exit(0)"]))
    read_files([f for fs in files.values() for f in fs])  # warm the page cache
    read_time = {m: best_of(2, lambda m=m: read_files(files[m])) for m in models}
    with tempfile.TemporaryDirectory(dir=work, prefix="bound-") as tmp:
        target = os.path.join(tmp, "out")

        def timed(write) -> float:
            settle()
            seconds = write(target, out_bytes)
            os.remove(target)
            return seconds
        buffered = best_of(2, lambda: timed(write_file))
        disk = best_of(2, lambda: timed(direct_write_seconds))
        settle()

    print(f"import torch (with start-up) {imports:.2f} s; {out_bytes / 1e9:.2f} GB written: buffered "
          f"{buffered:.2f} s (the floor's), O_DIRECT {disk:.2f} s; compute: min of {a.repeat} in-process runs")
    print()
    print("| method | floor s | compute s | bound s (import + max(compute, disk)) | bound / floor "
          "| (import + disk) / floor | target |")
    print("|---|---|---|---|---|---|---|")
    for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
        r = recipe(method, models, a.dtype)
        yml = os.path.join(recipes_dir, f"{method}.yml")
        with open(yml, "w") as f:
            yaml.safe_dump(r, f, sort_keys=False)
        floor = sum(read_time[m] for m in recipe_inputs(r)) + buffered
        read_files([f for m in recipe_inputs(r) for f in files[m]])
        child = subprocess.run([sys.executable, __file__, "--compute", yml, "--repeat", str(a.repeat)],
                               env=env, capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"{method}: the compute run failed:\n{child.stderr}")
        compute = float(child.stdout.split()[-1])
        bound = imports + max(compute, disk)
        target = f"{TARGETS[method]}x" if method in TARGETS else "-"
        print(f"| {method} | {floor:.2f} | {compute:.2f} | {bound:.2f} | {bound / floor:.1f}x | "
              f"{(imports + disk) / floor:.1f}x | {target} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
