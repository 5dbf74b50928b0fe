"""Pipeline overhead: `dvc repro` of one merge of the benchmark checkpoints vs the engine alone.

Builds (or reuses) the synthetic checkpoints of bench_merge.py, makes a throwaway git + DVC project
whose conf/ names them as local sources, and times, in one run:
  * engine: `python -m mergekit_ops RECIPE OUT` on the same recipe (the checkpoints' paths);
  * fresh: the first `dvc repro` (compose, the merge, DVC hashing every input and the output);
  * no-op: a second `dvc repro` (only the compose check runs);
  * recipe edit: `dvc repro` after a parameter change (the merge, hashing only its output).

    python bench/pipeline_overhead.py [--methods linear,ties] [--workdir bench/work]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import make_checkpoints  # noqa: E402
from bench_merge import recipe  # noqa: E402

NAMES = ["base", "ft1", "ft2", "ft3"]


def timed(cmd: list[str], cwd: str, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def project(path: str, ckpts: dict[str, str], method: str, env: dict) -> None:
    """A git + DVC project with this repo's code, the checkpoints as local models, one recipe."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.path.join(path, "conf", "models"))
    os.makedirs(os.path.join(path, "conf", "merges"))
    for code in ("stages", "mergekit_ops"):
        shutil.copytree(os.path.join(REPO, code), os.path.join(path, code),
                        ignore=shutil.ignore_patterns("__pycache__"))
    with open(os.path.join(path, "conf", "config.yaml"), "w") as f:
        yaml.safe_dump({"defaults": ["mergeforge_schema", "_self_"], "demo": {"enabled": False}}, f)
    for name, ckpt in ckpts.items():
        with open(os.path.join(path, "conf", "models", f"{name}.yaml"), "w") as f:
            yaml.safe_dump({"source": "local", "path": ckpt}, f)
    with open(os.path.join(path, "conf", "merges", f"{method}.yaml"), "w") as f:
        yaml.safe_dump(recipe(method, NAMES, "bfloat16"), f, sort_keys=False)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "cache.type", "hardlink,symlink"]):
        subprocess.run(cmd, cwd=path, env=env, check=True)
    subprocess.run([sys.executable, "-m", "stages.compose"], cwd=path, env=env, capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="linear,ties")
    p.add_argument("--workdir", default=os.path.join(HERE, "work"))
    p.add_argument("--size", choices=sorted(make_checkpoints.SIZES), default="default")
    args = p.parse_args()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    paths = make_checkpoints.build(os.path.join(args.workdir, f"ckpt-{args.size}-bfloat16"), args.size, "bfloat16")
    ckpts = dict(zip(NAMES, paths))
    for path in paths:  # warm page cache: both sides read the same inputs
        for f in sorted(os.listdir(path)):
            with open(os.path.join(path, f), "rb") as fh:
                while fh.read(64 << 20):
                    pass
    rows = []
    for method in args.methods.split(","):
        yml = os.path.join(args.workdir, f"overhead-{method}.yml")
        with open(yml, "w") as f:
            yaml.safe_dump(recipe(method, [ckpts[n] for n in NAMES], "bfloat16"), f, sort_keys=False)
        out = os.path.join(args.workdir, "out", f"overhead-{method}")
        engine = timed([sys.executable, "-m", "mergekit_ops", yml, out, "--quiet"], REPO, env)
        shutil.rmtree(out, ignore_errors=True)
        proj = os.path.join(args.workdir, f"pipeline-{method}")
        project(proj, ckpts, method, env)
        fresh = timed(["dvc", "repro"], proj, env)
        noop = timed(["dvc", "repro"], proj, env)
        edited = recipe(method, NAMES, "bfloat16")
        edited["parameters"] = {**edited.get("parameters", {}), "normalize": False}
        with open(os.path.join(proj, "conf", "merges", f"{method}.yaml"), "w") as f:
            yaml.safe_dump(edited, f, sort_keys=False)
        rebuild = timed(["dvc", "repro"], proj, env)
        rows.append((method, engine, fresh, rebuild, noop))
        shutil.rmtree(proj, ignore_errors=True)
    print("| method | engine alone s | fresh `dvc repro` s (/ engine) | recipe edit, `dvc repro` s (/ engine) "
          "| no-op `dvc repro` s |")
    print("|---|---|---|---|---|")
    for method, engine, fresh, rebuild, noop in rows:
        print(f"| {method} | {engine:.1f} | {fresh:.1f} ({fresh / engine:.2f}x) | {rebuild:.1f} ({rebuild / engine:.2f}x) "
              f"| {noop:.1f} |")


if __name__ == "__main__":
    main()
