"""Parity check: mergekit_ops vs mergekit-yaml on tiny float32 checkpoints.

Every deterministic method (plus gradients, filter lists, slices) runs through both tools on the same
YAML; prints per case the max abs difference over all tensors and the tensors that differ by more
than 1e-5. Exits 1 if a case differs beyond 1e-4 (or the tensor sets / configs differ, or a tool
fails).

    python bench/parity.py [--mergekit /tmp/mkvenv/bin/mergekit-yaml] [--workdir /tmp/mko_parity]
                           [--cases ties,slerp_filters] [--jobs 2] [--keep]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import make_checkpoints  # noqa: E402
from compare import compare_dirs, tail  # noqa: E402

DEFAULT_MERGEKIT = "/tmp/mkvenv/bin/mergekit-yaml"
REPORT_TOL = 1e-5
FAIL_TOL = 1e-4


def mk_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def ours_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def cases(B: str, F1: str, F2: str, F3: str) -> dict[str, dict]:
    """name -> recipe. B = base, F1..F3 = fine-tunes (absolute paths)."""
    fp32 = {"dtype": "float32"}

    def m(path, **params):
        return {"model": path, "parameters": params} if params else {"model": path}

    def gta(method, params_per_model, **shared):
        r = {"merge_method": method, "base_model": B,
             "models": [m(p, **kw) for p, kw in zip((F1, F2, F3), params_per_model)], **fp32}
        if shared:
            r["parameters"] = shared
        return r

    w3 = [dict(weight=0.5), dict(weight=0.3), dict(weight=0.2)]
    sparse3 = [dict(weight=0.5, density=0.3), dict(weight=0.3, density=0.5), dict(weight=0.2, density=0.7)]
    crumbs3 = [dict(weight=0.5, density=0.6, gamma=0.05), dict(weight=0.3, density=0.5, gamma=0.1),
               dict(weight=0.2, density=0.7, gamma=0.01)]
    slices_all = lambda *paths: [{"sources": [{"model": p, "layer_range": [0, 3]} for p in paths]}]  # noqa: E731
    return {
        "linear": {"merge_method": "linear",
                   "models": [m(B, weight=0.4), m(F1, weight=0.3), m(F2, weight=0.2), m(F3, weight=0.1)], **fp32},
        "linear_no_normalize": {"merge_method": "linear", "models": [m(F1, weight=0.5), m(F2, weight=0.7)],
                                "parameters": {"normalize": False}, **fp32},
        "linear_base_auto_added": {"merge_method": "linear", "base_model": B,
                                   "models": [m(F1, weight=0.5), m(F2, weight=0.3)],
                                   "parameters": {"weight": 0.2}, **fp32},
        "slerp": {"merge_method": "slerp", "base_model": B, "models": [m(B), m(F1)],
                  "parameters": {"t": 0.3}, **fp32},
        "slerp_gradient": {"merge_method": "slerp", "base_model": B, "models": [m(B), m(F1)],
                           "parameters": {"t": [0, 0.5, 1]}, **fp32},
        "slerp_slices_filters": {
            "merge_method": "slerp", "base_model": B, "slices": slices_all(B, F1),
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                 {"value": 0.5}]}, **fp32},
        "nuslerp": {"merge_method": "nuslerp", "models": [m(F1, weight=0.7), m(F2, weight=0.3)], **fp32},
        "nuslerp_base": {"merge_method": "nuslerp", "base_model": B,
                         "models": [m(F1, weight=1.0), m(F2, weight=2.0)], **fp32},
        "nuslerp_rows": {"merge_method": "nuslerp", "models": [m(F1, weight=0.6), m(F2, weight=0.4)],
                         "parameters": {"nuslerp_flatten": False}, **fp32},
        "nuslerp_cols_base": {"merge_method": "nuslerp", "base_model": B,
                              "models": [m(F1, weight=0.6), m(F2, weight=0.4)],
                              "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}, **fp32},
        "multislerp": {"merge_method": "multislerp",
                       "models": [m(F1, weight=1.0), m(F2, weight=2.0), m(F3, weight=3.0)], **fp32},
        "multislerp_base": {"merge_method": "multislerp", "base_model": B,
                            "models": [m(F1, weight=0.5), m(F2, weight=0.3), m(F3, weight=0.2)], **fp32},
        "karcher": {"merge_method": "karcher", "models": [m(F1), m(F2), m(F3)], **fp32},
        "karcher_base": {"merge_method": "karcher", "base_model": B, "models": [m(F1), m(F2)],
                         "parameters": {"max_iter": 20, "tol": 1e-7}, **fp32},
        "task_arithmetic": gta("task_arithmetic", w3),
        "task_arithmetic_lambda_norm": gta("task_arithmetic", w3, **{"lambda": 0.8, "normalize": True}),
        "ties": gta("ties", sparse3),
        "ties_no_normalize_lambda": gta("ties", sparse3, **{"normalize": False, "lambda": 1.5}),
        "ties_gradient_filter": gta(
            "ties", [{}, {}, {}],
            weight=[{"filter": "mlp", "value": [0.2, 0.8]}, {"filter": "self_attn", "value": [0.8, 0.2]},
                    {"value": 0.5}],
            density=[0.3, 0.9]),
        "breadcrumbs": gta("breadcrumbs", crumbs3),
        "breadcrumbs_ties": gta("breadcrumbs_ties", crumbs3),
        "model_stock": {"merge_method": "model_stock", "base_model": B, "models": [m(F1), m(F2), m(F3)], **fp32},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": B, "models": [m(F1), m(F2)],
                                    "parameters": {"filter_wise": True}, **fp32},
        "sce": {"merge_method": "sce", "base_model": B, "models": [m(F1), m(F2), m(F3)],
                "parameters": {"select_topk": 0.5}, **fp32},
        "sce_topk1": {"merge_method": "sce", "base_model": B, "models": [m(F1), m(F2), m(F3)], **fp32},
        "nearswap": {"merge_method": "nearswap", "base_model": B, "models": [m(B), m(F1)],
                     "parameters": {"t": 0.001}, **fp32},
        "ram": {"merge_method": "ram", "base_model": B, "models": [m(F1), m(F2), m(F3)], **fp32},
        "ram_epsilon": {"merge_method": "ram", "base_model": B, "models": [m(F1), m(F2), m(F3)],
                        "parameters": {"epsilon": 0.001}, **fp32},  # one delta std: 0, 1, 2 and 3 movers
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": B, "models": [m(F1), m(F2), m(F3)],
                       "parameters": {"epsilon": 0.001}, **fp32},  # every shared/unique ratio above alpha
        "ramplus_tl_params": {"merge_method": "ramplus_tl", "base_model": B, "models": [m(F1), m(F2), m(F3)],
                              "parameters": {"r": 0.5, "alpha": 0.3, "epsilon": 0.002}, **fp32},  # most below alpha
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": B, "models": [m(B), m(F1)], **fp32},
        "arcee_fusion_base_unlisted": {"merge_method": "arcee_fusion", "base_model": B, "models": [m(F3)], **fp32},
        "passthrough_slices": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": F1, "layer_range": [0, 2]}]},
            {"sources": [{"model": F2, "layer_range": [1, 3]}]}], **fp32},
        "passthrough_scale_filter": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": F1, "layer_range": [0, 3], "parameters": {
                "scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.0},
                          {"value": 1.0}]}}]}], **fp32},
        "task_arithmetic_slices_gradient": {
            "merge_method": "task_arithmetic", "base_model": B, "slices": [
                {"sources": [{"model": B, "layer_range": [0, 2]},
                             {"model": F1, "layer_range": [0, 2], "parameters": {"weight": [0.0, 1.0]}},
                             {"model": F2, "layer_range": [0, 2], "parameters": {"weight": 0.5}}]},
                {"sources": [{"model": B, "layer_range": [1, 3]},
                             {"model": F1, "layer_range": [1, 3], "parameters": {"weight": [1.0, 0.0]}},
                             {"model": F2, "layer_range": [1, 3], "parameters": {"weight": 0.25}}]}],
            **fp32},
        "linear_filter_list_weights": {
            "merge_method": "linear", "models": [
                m(F1, weight=[{"filter": "mlp", "value": [0.1, 0.9]}, {"filter": "embed", "value": 0.3},
                              {"value": 1.0}]),
                m(F2, weight=0.5)], **fp32},
    }


def run(cmd: list[str], env: dict, log: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mergekit", default=DEFAULT_MERGEKIT, help="path to mergekit-yaml")
    p.add_argument("--python", default=sys.executable, help="python that runs mergekit_ops")
    p.add_argument("--workdir", default="/tmp/mko_parity")
    p.add_argument("--cases", help="comma-separated subset of case names")
    p.add_argument("--jobs", type=int, default=2, help="cases run concurrently")
    p.add_argument("--keep", action="store_true", help="keep the merged outputs")
    a = p.parse_args(argv)
    if not os.path.exists(a.mergekit):
        print(f"mergekit-yaml not found at {a.mergekit}", file=sys.stderr)
        return 2

    work = os.path.abspath(a.workdir)
    B, F1, F2, F3 = make_checkpoints.build(os.path.join(work, "ckpt"), "tiny", "float32", 3, seed=1234,
                                           verbose=False)
    all_cases = cases(B, F1, F2, F3)
    names = a.cases.split(",") if a.cases else list(all_cases)
    unknown = [n for n in names if n not in all_cases]
    if unknown:
        print(f"unknown cases: {unknown}; known: {', '.join(all_cases)}", file=sys.stderr)
        return 2

    def one(name: str) -> tuple[str, dict]:
        d = os.path.join(work, "cases", name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        recipe = os.path.join(d, "recipe.yml")
        with open(recipe, "w") as f:
            yaml.safe_dump(all_cases[name], f, sort_keys=False)
        ours, mk = os.path.join(d, "ours"), os.path.join(d, "mergekit")
        rc_o, t_o = run([a.python, "-m", "mergekit_ops", recipe, ours, "--quiet"], ours_env(),
                        os.path.join(d, "ours.log"))
        rc_m, t_m = run([a.mergekit, recipe, mk, "--no-write-model-card", "--no-copy-tokenizer", "--quiet"],
                        mk_env(), os.path.join(d, "mergekit.log"))
        res = {"rc_ours": rc_o, "rc_mk": rc_m, "t_ours": t_o, "t_mk": t_m, "dir": d}
        if rc_o == 0 and rc_m == 0:
            res["cmp"] = compare_dirs(ours, mk, REPORT_TOL)
        return name, res

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        results = dict(pool.map(one, names))

    failed = []
    print(f"\n| case | max abs diff | worst tensor | tensors > {REPORT_TOL:g} | ours s | mergekit s | status |")
    print("|---|---|---|---|---|---|---|")
    details = []
    for name in names:
        r = results[name]
        if "cmp" not in r:
            status = f"ERROR (ours rc={r['rc_ours']}, mergekit rc={r['rc_mk']})"
            failed.append(name)
            details.append(f"### {name}: {status}\nours.log:\n{tail(os.path.join(r['dir'], 'ours.log'))}"
                           f"mergekit.log:\n{tail(os.path.join(r['dir'], 'mergekit.log'))}")
            print(f"| {name} | - | - | - | {r['t_ours']:.1f} | {r['t_mk']:.1f} | {status} |")
            continue
        c = r["cmp"]
        ok = c.structural_ok and not c.nonfinite and c.max_abs <= FAIL_TOL
        status = "ok" if ok else "FAIL"
        if not ok:
            failed.append(name)
        n_bad = len(c.differing)
        print(f"| {name} | {c.max_abs:.3g} | {c.worst if c.max_abs else '-'} | {n_bad}/{c.n_tensors} | {r['t_ours']:.1f} | "
              f"{r['t_mk']:.1f} | {status} |")
        lines = []
        if c.differing:
            lines.append("  differing (> %g): " % REPORT_TOL +
                         ", ".join(f"{n} ({v:.3g})" for n, v in c.differing[:40]) +
                         (f" … +{len(c.differing) - 40}" if len(c.differing) > 40 else ""))
        for label, items in (("only in ours", c.only_a), ("only in mergekit", c.only_b),
                             ("mismatched", c.mismatched), ("non-finite", c.nonfinite),
                             ("config", c.config_diffs)):
            if items:
                lines.append(f"  {label}: " + ", ".join(items[:20]))
        if lines:
            details.append(f"### {name}\n" + "\n".join(lines))
    if details:
        print("\n" + "\n".join(details))
    if not a.keep:
        shutil.rmtree(os.path.join(work, "cases"), ignore_errors=True)
    print(f"\n{len(names) - len(failed)}/{len(names)} cases within {FAIL_TOL:g}"
          + (f"; failing: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
