"""Benchmark mergekit_ops against mergekit-yaml and the I/O floor, in one run.

Builds (or reuses) synthetic Llama checkpoints (bench/make_checkpoints.py: base + 3 fine-tunes), writes
one mergekit YAML per method and measures, with a warm page cache:
  * the floor: reading the method's input files once + writing one output-sized file;
  * ours: `python -m mergekit_ops YAML OUT --quiet` wall time and peak RSS;
  * mergekit: `mergekit-yaml YAML OUT` wall time and peak RSS (if found; --no-mergekit skips it);
  * startup: `--help` of both tools;
and compares both outputs tensor by tensor (max abs difference in fp32).

    python bench/bench_merge.py [--size default|small] [--methods linear,ties] [--repeat 1]
                                [--no-mergekit] [--mergekit PATH] [--workdir bench/work] [--device cuda]

Times are the minimum over --repeat runs; RSS the maximum. Peak RSS comes from /usr/bin/time -v
(falls back to getrusage of the child), so it includes mapped input pages the process touched.
"""
from __future__ import annotations

import argparse
import mmap
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import make_checkpoints  # noqa: E402
from compare import compare_dirs, tail  # noqa: E402

DEFAULT_MERGEKIT = "/tmp/mkvenv/bin/mergekit-yaml"
DEFAULT_METHODS = ["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "model_stock"]
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
TIME_BIN = "/usr/bin/time"
CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------- recipes
def recipe(method: str, models: list[str], dtype: str) -> dict:
    """A mergekit YAML as a user would write it. models[0] is the base."""
    base, fts = models[0], models[1:]
    third = 1.0 / len(fts)

    def gta(**params):
        return {"merge_method": method, "base_model": base,
                "models": [{"model": p, "parameters": dict(params)} for p in fts], "dtype": dtype}

    if method == "linear":
        w = 1.0 / len(models)
        return {"merge_method": "linear", "models": [{"model": p, "parameters": {"weight": w}} for p in models],
                "dtype": dtype}
    if method in ("slerp", "nearswap"):
        return {"merge_method": method, "base_model": base, "models": [{"model": base}, {"model": fts[0]}],
                "parameters": {"t": 0.5 if method == "slerp" else 0.001}, "dtype": dtype}
    if method == "task_arithmetic":
        return gta(weight=third)
    if method in ("ties", "dare_ties", "dare_linear"):
        return gta(weight=third, density=0.5)
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        return gta(weight=third, density=0.5, gamma=0.01)
    if method in ("della", "della_linear"):
        return gta(weight=third, density=0.5, epsilon=0.1)
    if method in ("model_stock", "karcher"):
        return {"merge_method": method, "base_model": base, "models": [{"model": p} for p in fts], "dtype": dtype}
    if method == "sce":
        return {"merge_method": "sce", "base_model": base, "models": [{"model": p} for p in fts],
                "parameters": {"select_topk": 0.5}, "dtype": dtype}
    if method == "nuslerp":
        return {"merge_method": "nuslerp", "base_model": base,
                "models": [{"model": p, "parameters": {"weight": 0.5}} for p in fts[:2]], "dtype": dtype}
    if method == "multislerp":
        return {"merge_method": "multislerp", "base_model": base,
                "models": [{"model": p, "parameters": {"weight": 1.0}} for p in fts], "dtype": dtype}
    raise SystemExit(f"no benchmark recipe for method {method!r}")


def recipe_inputs(r: dict) -> list[str]:
    paths = [m["model"] for m in r.get("models", [])]
    if r.get("base_model") and r["base_model"] not in paths:
        paths.append(r["base_model"])
    return paths


# ----------------------------------------------------------------------------------------------- measuring
def model_files(model_dir: str) -> list[str]:
    return sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir))


def dir_bytes(model_dir: str) -> int:
    return sum(os.path.getsize(f) for f in model_files(model_dir) if f.endswith(".safetensors"))


# Page-aligned anonymous-mmap buffers: reads into them run at the speed of `dd bs=1M`, much faster
# than into a bytearray (docs/benchmarks.md), which makes the bound honest.
_rbuf = mmap.mmap(-1, CHUNK)


def read_files(paths: list[str]) -> float:
    """Read every file once (into one reused buffer); returns seconds."""
    view = memoryview(_rbuf)
    t0 = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            while os.readv(fd, [view]):
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def write_file(path: str, nbytes: int) -> float:
    """Write nbytes of random data (no fsync, like both tools); returns seconds."""
    buf = mmap.mmap(-1, CHUNK)
    buf.write(os.urandom(CHUNK))
    view = memoryview(buf)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, view[:min(left, CHUNK)])
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def settle() -> None:
    """Flush dirty pages so one run's write-back does not slow the next (untimed)."""
    os.sync()


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    busy = sum(v[:8]) - v[3] - (v[4] if len(v) > 4 else 0)   # minus idle and iowait; guest is in user
    return busy / CLK_TCK


def busy_cores(interval: float = 1.0) -> float:
    """CPU cores busy (all processes) over `interval` seconds."""
    b1 = cpu_busy_seconds()
    time.sleep(interval)
    return (cpu_busy_seconds() - b1) / interval


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to max_wait s) until other processes use < threshold cores; returns the last reading."""
    deadline = time.monotonic() + max_wait
    busy = busy_cores()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        busy = busy_cores()
    return busy


def timed_run(cmd: list[str], env: dict, log_path: str) -> dict:
    """Run cmd in a fresh subprocess; wall seconds, peak RSS (bytes), CPU seconds, return code."""
    use_time = os.access(TIME_BIN, os.X_OK)
    rss_file = log_path + ".time"
    full = [TIME_BIN, "-v", "-o", rss_file] + cmd if use_time else cmd
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = ru0.ru_maxrss
    busy0 = cpu_busy_seconds()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(full, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    rss = cpu = None
    machine_busy = cpu_busy_seconds() - busy0
    if use_time:
        try:
            with open(rss_file) as f:
                text = f.read()
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
            rss = int(m.group(1)) * 1024 if m else None
            m = re.search(r"Exit status: (\d+)", text)
            rc = int(m.group(1)) if m else rc
        except OSError:
            pass
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # children's CPU (user + sys) accumulates over waited-for descendants: the delta is this run's
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    if rss is None:   # ru_maxrss of children is a running max; only meaningful when it grew
        rss = ru1.ru_maxrss * 1024 if ru1.ru_maxrss > before else None
    others = max(0.0, (machine_busy - cpu) / wall) if wall > 0 else None
    return {"wall": wall, "rss": rss, "cpu": cpu, "others": others, "rc": rc, "log": log_path}


def ours_cmd(python: str, yml: str, out: str, device: str) -> list[str]:
    return [python, "-m", "mergekit_ops", yml, out, "--quiet", "--device", device]


def mk_cmd(mergekit: str, yml: str, out: str, device: str) -> list[str]:
    # offline: no model card (it can query the hub), no tokenizer (the synthetic models have none)
    return [mergekit, yml, out, "--no-write-model-card", "--no-copy-tokenizer", "--quiet"] + (
        ["--cuda"] if device == "cuda" else [])


def envs() -> tuple[dict, dict]:
    ours = dict(os.environ)
    ours["PYTHONPATH"] = REPO + (os.pathsep + ours["PYTHONPATH"] if ours.get("PYTHONPATH") else "")
    mk = dict(os.environ)
    mk.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return ours, mk


def startup(cmd: list[str], env: dict, n: int = 3) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def ld(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(make_checkpoints.SIZES), default="default")
    p.add_argument("--dtype", choices=sorted(make_checkpoints.DTYPES), default="bfloat16",
                   help="checkpoint dtype and the recipes' `dtype`")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workdir", default=os.path.join(HERE, "work"))
    p.add_argument("--mergekit", help=f"path to mergekit-yaml (default: {DEFAULT_MERGEKIT} if it exists)")
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--no-compare", action="store_true", help="skip the output comparison")
    p.add_argument("--python", default=sys.executable, help="python that runs mergekit_ops")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where both tools do the math (mergekit-yaml gets --cuda)")
    p.add_argument("--seed", type=int, default=0, help="checkpoint seed")
    p.add_argument("--wait-quiet", type=float, default=300.0,
                   help="before each timed run wait up to this many seconds for other processes to leave the "
                        "CPUs idle; the CPU other processes used during each run is reported; 0 disables")
    a = p.parse_args(argv)

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    mergekit = None
    if not a.no_mergekit:
        mergekit = a.mergekit or (DEFAULT_MERGEKIT if os.path.exists(DEFAULT_MERGEKIT) else None)
        if a.mergekit and not os.path.exists(a.mergekit):
            raise SystemExit(f"mergekit-yaml not found: {a.mergekit}")
    work = os.path.abspath(a.workdir)
    ours_env, mk_env = envs()

    t0 = time.perf_counter()
    models = make_checkpoints.build(os.path.join(work, f"ckpt-{a.size}-{a.dtype}"), a.size, a.dtype, 3, a.seed)
    print(f"checkpoints ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    files = {m: [f for f in model_files(m) if f.endswith(".safetensors")] for m in models}
    out_bytes = dir_bytes(models[0])

    recipes_dir = os.path.join(work, "recipes", f"{a.size}-{a.dtype}")
    out_root = os.path.join(work, "out")
    logs = os.path.join(work, "logs")
    for d in (recipes_dir, logs):
        os.makedirs(d, exist_ok=True)
    shutil.rmtree(out_root, ignore_errors=True)
    os.makedirs(out_root)

    # startup
    st_ours = startup([a.python, "-m", "mergekit_ops", "--help"], ours_env)
    st_mk = startup([mergekit, "--help"], mk_env) if mergekit else None

    # warm the page cache, then the floor: per-model read time and one output-sized write (min of 2 each)
    read_files([f for fs in files.values() for f in fs])
    read_time = {m: min(read_files(files[m]) for _ in range(2)) for m in models}
    settle()
    with tempfile.NamedTemporaryFile(dir=work, prefix="floor-", delete=False) as tf:
        floor_path = tf.name
    write_time = float("inf")
    for _ in range(2):
        write_time = min(write_time, write_file(floor_path, out_bytes))
        os.remove(floor_path)
        settle()

    rows = []
    for method in methods:
        r = recipe(method, models, a.dtype)
        yml = os.path.join(recipes_dir, f"{method}.yml")
        with open(yml, "w") as f:
            yaml.safe_dump(r, f, sort_keys=False)
        inputs = recipe_inputs(r)
        in_files = [f for m in inputs for f in files[m]]
        floor = sum(read_time[m] for m in inputs) + write_time
        row = {"method": method, "floor": floor, "ours": None, "mk": None, "ours_rss": None, "mk_rss": None,
               "ours_cpu": None, "mk_cpu": None, "ours_others": None, "mk_others": None, "cmp": None, "note": ""}
        out_ours, out_mk = os.path.join(out_root, f"ours-{method}"), os.path.join(out_root, f"mk-{method}")
        tools = [("ours", ours_cmd(a.python, yml, out_ours, a.device), ours_env, out_ours)]
        if mergekit:
            tools.append(("mk", mk_cmd(mergekit, yml, out_mk, a.device), mk_env, out_mk))
        for rep in range(a.repeat):
            for key, cmd, env, out in tools:
                shutil.rmtree(out, ignore_errors=True)
                settle()
                read_files(in_files)   # re-warm (untimed): earlier outputs may have pushed inputs out
                if a.wait_quiet > 0:
                    wait_quiet(a.wait_quiet)
                res = timed_run(cmd, env, os.path.join(logs, f"{key}-{method}-{rep}.log"))
                if res["rc"] != 0:
                    row["note"] += f" {key} failed (rc {res['rc']}, log {res['log']})"
                    print(f"{key} {method} failed:\n{tail(res['log'])}", file=sys.stderr)
                    continue
                if row[key] is None or res["wall"] < row[key]:
                    row[key], row[key + "_cpu"], row[key + "_others"] = res["wall"], res["cpu"], res["others"]
                if res["rss"] is not None:
                    row[key + "_rss"] = max(row[key + "_rss"] or 0, res["rss"])
                print(f"  {method} {key} run {rep + 1}: {res['wall']:.1f} s, cpu {res['cpu']:.1f} s, peak RSS "
                      f"{gb(res['rss'])} GB, other processes {res['others']:.2f} cores",
                      file=sys.stderr)
        settle()
        if mergekit and not a.no_compare and row["ours"] is not None and row["mk"] is not None:
            if method in RANDOM_METHODS:
                row["cmp"] = "random"
            else:
                row["cmp"] = compare_dirs(out_ours, out_mk, tol=0.0)
        shutil.rmtree(out_ours, ignore_errors=True)
        shutil.rmtree(out_mk, ignore_errors=True)
        rows.append(row)

    # ------------------------------------------------------------------------------------------- report
    cfg = make_checkpoints.SIZES[a.size]
    nparams = make_checkpoints.num_params(cfg)
    print()
    print(f"## mergekit_ops benchmark — size `{a.size}` ({nparams / 1e9:.3f}B params, {a.dtype}, "
          f"{out_bytes / 1e9:.2f} GB per model, base + 3 fine-tunes)")
    print(f"host: {platform.node()}, {os.cpu_count()} CPUs, math on {a.device}, load average at end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; repeat={a.repeat} (time: min, RSS: max)")
    print(f"floor: read {sum(read_time.values()):.2f} s for all {len(models)} models "
          f"({sum(dir_bytes(m) for m in models) / sum(read_time.values()) / 1e9:.1f} GB/s warm), "
          f"write {out_bytes / 1e9:.2f} GB {write_time:.2f} s")
    print(f"startup (`--help`): ours {st_ours:.2f} s, mergekit {secs(st_mk)} s")
    print()
    print("| method | ours s | ours peak RSS GB | mergekit s | mergekit RSS GB | speedup | ours/floor | floor s "
          "| ours CPU s | mergekit CPU s | other load (cores) ours / mergekit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        speed = f"{row['mk'] / row['ours']:.1f}x" if row["ours"] and row["mk"] else "-"
        ratio = f"{row['ours'] / row['floor']:.1f}" if row["ours"] else "-"
        print(f"| {row['method']} | {secs(row['ours'])} | {gb(row['ours_rss'])} | {secs(row['mk'])} | "
              f"{gb(row['mk_rss'])} | {speed} | {ratio} | {secs(row['floor'])} | {secs(row['ours_cpu'])} | "
              f"{secs(row['mk_cpu'])} | {ld(row['ours_others'])} / {ld(row['mk_others'])} |" + (f" {row['note']}" if row["note"] else ""))
    if mergekit and not a.no_compare:
        print()
        print("| method | max abs diff (fp32) | worst tensor | elements not bit-equal | tensor-set / dtype / config |")
        print("|---|---|---|---|---|")
        for row in rows:
            c = row["cmp"]
            if c is None:
                print(f"| {row['method']} | - | - | - | not run |")
            elif c == "random":
                print(f"| {row['method']} | not comparable (random masks) | - | - | - |")
            else:
                frac = c.n_elems_diff / c.numel if c.numel else 0.0
                struct = "same" if c.structural_ok else "; ".join(
                    (c.only_a and [f"only ours: {len(c.only_a)}"] or []) + (c.only_b and [f"only mergekit: {len(c.only_b)}"] or [])
                    + c.mismatched[:3] + c.config_diffs)
                print(f"| {row['method']} | {c.max_abs:.3g} | {c.worst if c.max_abs else '-'} | {c.n_elems_diff} ({frac:.2%}) | {struct} |")
    return 1 if any(r["note"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
