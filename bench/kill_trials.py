"""Kill -9 trials: does a merge killed at a random point leave its output whole, and does the next
run clean up after it?

Scenarios (each N trials, SIGKILL to the whole process group after a random delay in
[0, SPAN x typical duration]; a different --seed / conf seed per trial, so a finished run changes the bytes):
  engine       `python -m mergekit_ops --quiet RECIPE OUT`, dare_ties of a base + 3 models (~450 MB
               each, sharded output), and the same with a 2-document recipe (intermediates exist).
               After each kill OUT must be byte-identical to the previous output or a complete new
               one (files as listed, loadable, marker present). A last normal run must clean up.
  dvc          `dvc repro` of a temp git+DVC project (tests/pipeline.py) whose merge stage builds
               artifacts/merges/dt. After each kill a plain `dvc repro` must succeed, `dvc status`
               be clean, the artifact load and be new, and no leftovers or stale locks remain.

    .venv/bin/python bench/kill_trials.py [--trials 20] [--seed S] [--span 1] [--only engine|dvc] [--keep]

Prints one table per scenario; exits 1 if any trial failed (broken output, failed rerun, leftovers).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
os.environ.update(DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pipeline import new_project, read_conf, run, write_conf  # noqa: E402
from tiny import llama_state, tree_digests, write_family, write_recipe  # noqa: E402

SHAPE = dict(layers=16, hidden=768, inter=2048)  # ~450 MB per model in float32: a merge long enough to kill mid-way
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
FAILED: list[str] = []


def fail(scenario: str, trial: int | str, what: str) -> None:
    FAILED.append(f"{scenario} trial {trial}: {what}")
    print(f"  !! {FAILED[-1]}", file=sys.stderr)


def kill_after(cmd: list[str], cwd: Path, delay: float, log: Path) -> tuple[subprocess.Popen, bool]:
    """Start cmd in its own process group; SIGKILL the group after `delay` s unless it ended first.
    Returns the process (reaped) and whether it completed on its own."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=delay)
        return proc, True
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return proc, False


def leftovers(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def complete(out: Path, files: set[str], tensors: set[str], prev: dict) -> str:
    """'' when out is a complete output (the expected files, index consistent, every shard loads,
    the marker present, no shard shared with the previous output); else what is wrong."""
    have = {p.name for p in out.iterdir()}
    if have != files:
        return f"files {sorted(have ^ files)} missing or extra"
    index = out / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        if set(weight_map) != tensors or not set(weight_map.values()) <= have:
            return "index does not match the tensors or names absent shards"
    try:
        loaded = {k for f in sorted(out.glob("*.safetensors")) for k in load_file(str(f))}
    except Exception as exc:  # noqa: BLE001 (a torn file raises whatever safetensors raises)
        return f"a shard does not load: {exc}"
    if loaded != tensors:
        return "tensors missing or extra"
    digests = tree_digests(out)
    if prev and any(digests[f] == prev.get(f) for f in digests if f.endswith(".safetensors")):
        return "mixed: some shards are the previous output's"
    return ""


def engine(work: Path, fam: dict, docs: int, trials: int, delay: Callable[[float], float]) -> dict:
    name = f"engine, {docs} doc{'s' * (docs > 1)}"
    models = lambda refs: [{"model": r, "parameters": {"weight": 0.5, "density": 0.5}} for r in refs]  # noqa: E731
    doc = {"merge_method": "dare_ties", "base_model": str(fam["base"]), "dtype": "float32",
           "models": models([str(fam[m]) for m in ("m0", "m1", "m2")])}
    final = {**doc, "models": models(["first", str(fam["m1"])])}
    recipe = write_recipe(work / f"recipe{docs}.yml", doc if docs == 1 else "---\n".join(
        json.dumps(d) + "\n" for d in ({"name": "first", **doc}, final)))
    out = work / f"out{docs}"
    cli = lambda seed: [sys.executable, "-m", "mergekit_ops", "--quiet", "--seed", str(seed),  # noqa: E731
                        "--out-shard-size", "100MB", str(recipe), str(out)]
    for seed in (1, 2):  # a warm-up, then the timed "previous output"
        t0 = time.perf_counter()
        subprocess.run(cli(seed), check=True, env=ENV, cwd=work)
        typical = time.perf_counter() - t0
    files, prev = {p.name for p in out.iterdir()}, tree_digests(out)
    tensors = {k for f in out.glob("*.safetensors") for k in load_file(str(f))}
    r = dict(trials=trials, typical_s=round(typical, 2), killed_before_start=0, killed_mid_merge=0,
             completed_before_kill=0, previous_output_intact=0, complete_new_output=0, broken=0,
             max_leftovers=0, max_leftover_bytes=0)
    for i in range(trials):
        proc, done = kill_after(cli(100 + i), work, delay(typical), work / "trial.log")
        mine = [p for p in leftovers(out) if p.name.endswith(f"-{proc.pid}")]
        if done and proc.returncode != 0:
            fail(name, i, f"exited {proc.returncode} unkilled: {(work / 'trial.log').read_text()[-500:]}")
        if not out.is_dir():
            r["broken"] += 1
            fail(name, i, f"OUT missing after the kill; leftovers: {[p.name for p in leftovers(out)]}")
            state = "broken"
        elif tree_digests(out) == prev:
            r["previous_output_intact"] += 1
            state = "previous"
        elif not (why := complete(out, files, tensors, prev)):
            r["complete_new_output"] += 1
            state, prev = "new", tree_digests(out)
        else:
            r["broken"] += 1
            fail(name, i, f"OUT is broken: {why}")
            state = "broken"
        kind = "completed_before_kill" if done else "killed_mid_merge" if mine or state == "new" else "killed_before_start"
        r[kind] += 1
        left = leftovers(out)
        r["max_leftovers"] = max(r["max_leftovers"], len(left))
        r["max_leftover_bytes"] = max(r["max_leftover_bytes"], sum(size(p) for p in left))
        print(f"  {name} trial {i}: {kind}, OUT {state}, leftovers {[p.name for p in left]}", file=sys.stderr)
    r["leftovers_before_cleanup"] = len(leftovers(out))
    proc = subprocess.run(cli(999), env=ENV, cwd=work, capture_output=True, text=True)
    notes = [ln for ln in proc.stderr.splitlines() if re.match(r"(removed|restored) ", ln)]
    r["cleanup_run_notes"] = notes
    r["leftovers_after_cleanup"] = len(leftovers(out))
    if proc.returncode != 0 or r["leftovers_after_cleanup"] or complete(out, files, tensors, prev):
        fail(name, "cleanup", f"exit {proc.returncode}, leftovers {leftovers(out)}: {proc.stderr[-500:]}")
    return r


AUTO_REMOVED = "had been killed. Auto removed it from the lock file"
LOCKISH = re.compile(r"busy|unable to acquire|lock", re.I)
NOT_LOCKISH = re.compile(r"Updating lock file|git add dvc.lock|" + AUTO_REMOVED)


def lock_valid(text: str) -> bool:
    """Whether DVC would accept this dvc.lock (its own schema) and it records the merge stage."""
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA

    try:
        return "merge-dt" in COMPILED_LOCKFILE_SCHEMA(yaml.safe_load(text))["stages"]
    except Exception:  # noqa: BLE001 (yaml or voluptuous errors: either way DVC rejects it)
        return False


def dead_lock_pids(rwlock: Path) -> set[int]:
    """Processes named in DVC's rwlock file that are no longer running."""
    data = json.loads(rwlock.read_text() or "{}") if rwlock.exists() else {}
    infos = [i for kind in data.values() for entries in kind.values()
             for i in (entries if isinstance(entries, list) else [entries])]
    return {i["pid"] for i in infos if not Path(f"/proc/{i['pid']}").exists()}


def dvc(work: Path, fam: dict, trials: int, delay: Callable[[float], float]) -> dict:
    from stages.common import tracking

    name = "dvc repro"
    tracking.connect(work / "mlflow-template")  # migrate one DB, as tests/conftest.py does
    recipe = {"merge_method": "dare_ties", "base_model": "base", "dtype": "float32", "seed": 0,
              "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in ("m0", "m1", "m2")]}
    project = new_project(work / "project", fam, {"dt": recipe}, mlflow_db=work / "mlflow-template" / "mlflow.db")
    art, rwlock = project / "artifacts" / "merges" / "dt", project / ".dvc" / "tmp" / "rwlock"
    run(["dvc", "repro"], project)
    write_conf(project, "merges", "dt", {**recipe, "seed": 1})
    t0 = time.perf_counter()
    run(["dvc", "repro"], project)
    typical = time.perf_counter() - t0
    prev, files = tree_digests(art), {p.name for p in art.iterdir()}
    tensors = {k for f in art.glob("*.safetensors") for k in load_file(str(f))}
    r = dict(trials=trials, typical_s=round(typical, 2), killed_before_start=0, killed_mid_merge=0,
             completed_before_kill=0, previous_output_intact=0, complete_new_output=0, out_removed_by_dvc=0,
             broken=0, max_leftovers=0, max_leftover_bytes=0, reruns_succeeded=0, reruns_needing_second_run=0,
             leftovers_after_cleanup=0, dvc_lock_torn_by_kill=0, rwlock_dead_pids_max=0,
             rwlock_auto_removed_warnings=0, lock_messages=[])
    for i in range(trials):
        write_conf(project, "merges", "dt", {**read_conf(project, "merges", "dt"), "seed": 100 + i})
        log = work / "repro.log"
        proc, done = kill_after(["dvc", "repro"], project, delay(typical), log)
        said = log.read_text()
        started = "Running stage 'merge-dt'" in said
        r["completed_before_kill" if done else "killed_mid_merge" if started else "killed_before_start"] += 1
        if done and proc.returncode != 0:
            fail(name, i, f"unkilled `dvc repro` exited {proc.returncode}: {said[-500:]}")
        if not art.exists():
            r["out_removed_by_dvc"] += 1
        elif tree_digests(art) == prev:
            r["previous_output_intact"] += 1
        elif not complete(art, files, tensors, {}):
            r["complete_new_output"] += 1
        else:
            r["broken"] += 1
            fail(name, i, f"artifact broken after the kill: {complete(art, files, tensors, {})}")
        left = leftovers(art)
        r["max_leftovers"] = max(r["max_leftovers"], len(left))
        r["max_leftover_bytes"] = max(r["max_leftover_bytes"], sum(size(p) for p in left))
        r["rwlock_dead_pids_max"] = max(r["rwlock_dead_pids_max"], len(dead_lock_pids(rwlock)))
        lock_text = (project / "dvc.lock").read_text()
        if not lock_valid(lock_text):
            r["dvc_lock_torn_by_kill"] += 1
            shutil.copyfile(project / "dvc.lock", work / f"dvc.lock.torn-trial{i}")
            fail(name, i, f"dvc.lock torn by the kill ({len(lock_text)} chars; ends {lock_text[-120:]!r}); "
                 f"the killed run's last lines: {said.strip().splitlines()[-3:]}")
        again = run(["dvc", "repro"], project, check=False)
        text = again.stdout + again.stderr
        if again.returncode == 1 and "run `dvc repro` again" in text:
            r["reruns_needing_second_run"] += 1
            again = run(["dvc", "repro"], project, check=False)
            text += again.stdout + again.stderr
        r["rwlock_auto_removed_warnings"] += text.count(AUTO_REMOVED)
        r["lock_messages"] += [f"trial {i}: {ln}" for ln in text.splitlines()
                               if LOCKISH.search(ln) and not NOT_LOCKISH.search(ln)]
        status = run(["dvc", "status"], project, check=False)
        dirty = [ln for ln in status.stdout.splitlines() if ln.strip() and not re.match(
            r"(compose:|\s+always changed|Data and pipelines are up to date)", ln)]
        now = tree_digests(art) if art.is_dir() else {}
        why = ("artifact missing" if not now else "unchanged: the previous trial's bytes" if now == prev
               else complete(art, files, tensors, prev))
        if again.returncode == 0 and not dirty and not why and now != prev:
            r["reruns_succeeded"] += 1
        else:
            fail(name, i, f"rerun exit {again.returncode}, status {dirty}, artifact: {why}; output: {text.strip()!r}")
            print(f"  {name}: the project no longer builds; the remaining trials are skipped", file=sys.stderr)
            r["trials"] = i + 1
            break
        prev = now or prev
        r["leftovers_after_cleanup"] = max(r["leftovers_after_cleanup"], len(leftovers(art)))
        print(f"  {name} trial {i}: {'completed' if done else 'merge started' if started else 'before merge'}, "
              f"leftovers {[p.name for p in left]} -> {[p.name for p in leftovers(art)]}", file=sys.stderr)
    r["rwlock_dead_pids_at_end"] = len(dead_lock_pids(rwlock))
    if r["leftovers_after_cleanup"]:
        fail(name, "all", f"leftovers remained after a rerun: {leftovers(art)}")
    return r


def table(title: str, r: dict) -> None:
    print(f"\n{title}\n" + "-" * 44)
    for k, v in r.items():
        if isinstance(v, list):
            print(f"{k:<30} {len(v)}" + "".join(f"\n    {x}" for x in v))
        else:
            print(f"{k:<30} {v}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=None, help="seed of the random kill points")
    p.add_argument("--span", type=float, default=1.0,
                   help="kill points are drawn in [0, SPAN x the typical duration] (default 1)")
    p.add_argument("--only", choices=("engine", "dvc"))
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    span = lambda typical: rng.uniform(0, args.span * typical)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="kill_trials-"))
    print(f"kill-point seed {seed}, work dir {work}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        fam = write_family(work / "src", llama_state(**SHAPE, seed=1), 1)
        results = {}
        if args.only != "dvc":
            for docs in (1, 2):
                results[f"engine, {docs} document(s)"] = engine(work, fam, docs, args.trials, span)
        if args.only != "engine":
            results["dvc repro merge stage"] = dvc(work, fam, args.trials, span)
        for title, r in results.items():
            table(title, r)
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; kill-point seed {seed}; "
          f"{len(FAILED)} failure(s)" + "".join(f"\n  {f}" for f in FAILED))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
