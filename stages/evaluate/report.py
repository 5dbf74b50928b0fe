"""report stage: how a merge compares with its parents and its base on every task, from their
metrics files (artifacts/eval/NAME.json).

Retention on a task = the merge's score / the best parent's score (for perplexity, where lower is
better: the best parent's / the merge's), so 1.0 means the merge kept the best parent's level and
more than 1.0 means it beat every parent. The parents are the models merged; a base_model their
differences are taken from is shown as the base. Writes artifacts/reports/NAME/:
  report.md       the table (every task, the merge, each parent, the base, retention)
  retention.json  {suite: {task: retention}}                   (DVC metrics)
  scores.json     one row per (task, model) for the bar plots   (DVC plots)
  scores.png      the same as a picture: per-task bars, the merge highlighted, values written on them
  retention.png   retention per task as a picture, with the line at 1.0 (report.md shows both)

    python -m stages.evaluate.report NAME
    python -m stages.evaluate.report --all     (every model's scores as one table: `mergeforge report`)
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import yaml

from ..common import pictures
from ..common.atomic import write_json, write_text
from ..common.errors import EvalError
from ..common.layout import metrics_file, report_dir, report_files, roles
from ..common.metrics import HIGHER_IS_BETTER, load_metrics
from ..common.stage_cli import in_section, run_stage
from .suites import read_cases, split_items


def compare(name: str, params: dict) -> dict:
    """{'models': [(role, name)...], 'tasks': [{suite, task, kind, scores: {model: v}, retention}]}."""
    compared = roles(name, params)
    merged = [m for role, m in compared if role == "parent"]
    metrics = {m: load_metrics(m, params) for _, m in compared}
    tasks = []
    for suite, by_kind in sorted(metrics[name].items()):
        for kind, scores in sorted(by_kind.items()):
            for task in sorted(scores):
                row = {m: metrics[m].get(suite, {}).get(kind, {}).get(task) for _, m in compared}
                tasks.append({"suite": suite, "task": task, "kind": kind, "scores": row,
                              "retention": retention(row[name], [row[p] for p in merged], kind)})
    return {"models": compared, "tasks": tasks}


def retention(merged: float, parent_scores: list[float | None], kind: str) -> float | None:
    known = [s for s in parent_scores if s is not None]
    if merged is None or not known:
        return None
    if HIGHER_IS_BETTER[kind]:
        best = max(known)
        return merged / best if best else None
    return min(known) / merged if merged else None


def markdown(name: str, comparison: dict) -> str:
    roles = comparison["models"]
    head = ["suite/task", "metric"] + [f"{m} ({role})" for role, m in roles] + ["retention"]
    lines = [f"# {name}: merge vs parents and base", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for t in comparison["tasks"]:
        cells = ([f"{t['suite']}/{t['task']}", t["kind"]] + [_fmt(t["scores"][m]) for _, m in roles]
                 + [_fmt(t["retention"])])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Retention: the merge's score / the best parent's (perplexity: the best parent's / the merge's)."]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def write(name: str, params: dict) -> Path:
    comparison = compare(name, params)
    files = report_files(name, params)
    kept: dict[str, dict] = {}
    for t in comparison["tasks"]:
        kept.setdefault(t["suite"], {})[t["task"]] = t["retention"]
    rows = [{"task": f"{t['suite']}/{t['task']}", "model": f"{m} ({role})", "score": t["scores"][m],
             "label": f"{t['suite']}/{t['task']}: {m} ({role})"}
            for t in comparison["tasks"] for role, m in comparison["models"] if t["scores"][m] is not None]
    write_json(files["retention"], kept)
    write_json(files["scores"], {"scores": rows})
    pictures.save(pictures.scores(name, comparison), files["scores_png"])
    pictures.save(pictures.retention(name, comparison), files["retention_png"])
    shown = (f"![{name}: the merge against its parents and base, per task]({files['scores_png'].name})\n\n"
             f"![{name}: retention per task]({files['retention_png'].name})\n")
    write_text(files["table"], markdown(name, comparison) + "\n" + shown)
    return report_dir(name, params)


def leaderboard(params: dict) -> str:
    """Every evaluated model and merge on every task of the test split, with each suite's mean
    where higher is better: its standard error (exact match, from the number of test items) and,
    where the suite has one, the mean on the validation split (what searches tune on) beside it."""
    names = [n for n in list(params["models"]) + list(params["merges"]) if metrics_file(n, params).is_file()]
    if not names:
        raise EvalError("no metrics yet: `dvc repro` evaluates every model and merge")
    metrics = {n: load_metrics(n, params) for n in names}
    validation = {n: load_metrics(n, params, "validation") if metrics_file(n, params, "validation").is_file() else {}
                  for n in names}
    columns = sorted({(suite, kind, task) for m in metrics.values() for suite, by_kind in m.items()
                      for kind, scores in by_kind.items() for task in scores})
    means = sorted({(suite, kind) for suite, kind, _ in columns if HIGHER_IS_BETTER[kind]})
    counts = {(s, t): count_test_items(params["evaluate"]["suites"][s], t) for s, k, t in columns
              if k == "exact_match" and s in params["evaluate"]["suites"]}
    head = ["model"] + [f"{s}/{t}" for s, _, t in columns]
    for s, k in means:
        n = [counts[(s, t)] for s2, _, t in columns if s2 == s and (s, t) in counts]
        head += [f"{s} mean" + (f" ± SE (n = {sum(n)})" if n else ""), f"{s} validation mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        got = metrics[n]
        cells = [_fmt(got.get(s, {}).get(k, {}).get(t)) for s, k, t in columns]
        for s, k in means:
            scores = got.get(s, {}).get(k, {})
            mean = _fmt(sum(scores.values()) / len(scores)) if scores else "n/a"
            se = standard_error(scores, {t: counts.get((s, t)) for t in scores})
            cells.append(mean + (f" ± {se:.3f}" if se is not None else ""))
            held = validation[n].get(s, {}).get(k, {})
            cells.append(_fmt(sum(held.values()) / len(held)) if held else "n/a")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def standard_error(scores: dict[str, float], counts: dict[str, int | None]) -> float | None:
    """The standard error of the mean of accuracies over tasks, each over its own n items:
    sqrt(sum p(1-p)/n) / tasks; None when a count is unknown."""
    if not scores or any(not counts.get(t) for t in scores):
        return None
    return math.sqrt(sum(p * (1 - p) / counts[t] for t, p in scores.items())) / len(scores)


def count_test_items(suite: dict, task: str) -> int:
    """How many items the test split of an exact-match task holds (after the suite's limit)."""
    return len(split_items(suite, task, "test", read_cases))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print("usage: python -m stages.evaluate.report NAME | --all\n"
              "  NAME   the recipe whose merge is compared with its parents and base (artifacts/reports/NAME)\n"
              "  --all  print every evaluated model's scores as one table (`mergeforge report`)")
        return 0
    if args == ["--all"]:
        if not Path("params.yaml").is_file():
            print("error: no params.yaml here: run in a project's root, after `dvc repro`", file=sys.stderr)
            return 2
        params = yaml.safe_load(Path("params.yaml").read_text())
        try:
            print(leaderboard(params))
        except EvalError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    return run_stage(args, "stages.evaluate.report", "recipe", in_section("merges"),
                     lambda name, params: f"compared {name} with its parents: {write(name, params)}", (EvalError,))


if __name__ == "__main__":
    sys.exit(main())
