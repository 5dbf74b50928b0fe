"""Search throughput: trials per minute of a search of the project in the current directory (the
demo's `tuned` by default), and where a trial's time goes.

Runs the search's own trials (stages/search/trials.py) N times with fixed values, timing each part:
  merge      mergekit_ops.merge_tensors (the engine, into memory)
  load       copying the merged tensors into the resident model
  evaluate   the validation split of the objective's suite
then runs the whole search stage once on a fresh study (Optuna's sampling and storage and the MLflow
records included) and divides its trials by its wall time.

    .venv/bin/python bench/search_trials.py [NAME] [--trials 20]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, os.getcwd())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("name", nargs="?", default="tuned")
    p.add_argument("--trials", type=int, default=20)
    args = p.parse_args()
    from mergekit_ops import engine
    from stages.search import trials as trials_module
    from stages.search.space import parse_space

    params = yaml.safe_load(Path("params.yaml").read_text())
    spec = params["searches"][args.name]
    space = parse_space(spec["recipe"], spec.get("constraints"), args.name)
    setup = time.monotonic()
    trials = trials_module.Trials(args.name, spec, space, Path(tempfile.mkdtemp()))
    setup = time.monotonic() - setup
    spent = {"merge": 0.0, "load": 0.0, "evaluate": 0.0}

    def timed(part, fn):
        def wrapper(*a, **k):
            start = time.monotonic()
            try:
                return fn(*a, **k)
            finally:
                spent[part] += time.monotonic() - start
        return wrapper

    trials_module.merge_tensors = timed("merge", engine.merge_tensors)
    trials._load = timed("load", trials._load)
    trials._score = timed("evaluate", trials._score)
    rng = random.Random(0)
    start = time.monotonic()
    for _ in range(args.trials):
        trials.run({d.name: rng.choice(d.choices) if d.choices else rng.uniform(d.low, d.high) for d in space.dims})
    wall = time.monotonic() - start
    print(f"search {args.name}: {'in memory' if trials.in_memory else 'through files'}, {len(space.dims)} "
          f"dimensions, {os.cpu_count()} cores; set-up {setup:.2f} s (inputs opened, resident model loaded)\n")
    print("| part of a trial | seconds per trial | share |\n|---|---|---|")
    for part, seconds in spent.items():
        print(f"| {part} | {seconds / args.trials:.3f} | {seconds / wall:.0%} |")
    print(f"| trial, all parts | {wall / args.trials:.3f} | 100% |\n")
    work = Path(tempfile.mkdtemp())
    try:
        shutil.copytree(".", work / "p", ignore=shutil.ignore_patterns(".git", ".dvc", "mlruns", ".mergeforge"),
                        symlinks=True)
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "stages.search", args.name], cwd=work / "p", check=True,
                       stderr=subprocess.DEVNULL)
        stage = time.monotonic() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    budget = spec["budget"].get("trials")
    print(f"the whole stage: {budget} trials in {stage:.1f} s = {60 * budget / stage:.0f} trials per minute "
          "(Python start-up, Optuna and the MLflow records included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
