"""The comparison report: every task, the merge against each parent and the base, and retention
(merged / best parent; best parent / merged for perplexity)."""
import json
import math
import random

import pytest

from stages.common.layout import base_of
from stages.evaluate.report import compare, write


def _params(tmp_path, merges, baseline=None):
    return {"artifacts": str(tmp_path), "models": {m: {"source": "local", "path": m} for m in ("base", "a", "b", "c")},
            "merges": merges, "evaluate": {"baseline": baseline, "suites": {}}, "publish": {}}


def _merge(inputs, base=None):
    recipe = {"merge_method": "ties" if base else "linear"} | ({"base_model": base} if base else {})
    return {"recipe": recipe, "seed": 0, "device": "cpu", "inputs": {m: m for m in inputs}}


def _write_metrics(tmp_path, rng, names):
    scores = {}
    for name in names:
        scores[name] = {"skills": {"exact_match": {t: rng.random() for t in ("x", "y")}},
                        "text": {"perplexity": {"z": 1 + 10 * rng.random()}}}
        (tmp_path / "eval").mkdir(exist_ok=True)
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(scores[name]))
    return scores


def test_retention_against_the_best_parent_and_base_shown_apart(tmp_path, seed):
    rng = random.Random(seed)
    params = _params(tmp_path, {"m": _merge(["a", "b", "base"], base="base")})
    s = _write_metrics(tmp_path, rng, ["m", "a", "b", "base"])
    report = compare("m", params)
    assert report["models"] == [("merge", "m"), ("parent", "a"), ("parent", "b"), ("base", "base")]
    rows = {(t["suite"], t["task"]): t for t in report["tasks"]}
    for task in ("x", "y"):
        em = lambda n: s[n]["skills"]["exact_match"][task]  # noqa: E731
        assert rows["skills", task]["retention"] == pytest.approx(em("m") / max(em("a"), em("b")))
        assert rows["skills", task]["scores"]["base"] == em("base")
    ppl = lambda n: s[n]["text"]["perplexity"]["z"]  # noqa: E731
    assert rows["text", "z"]["retention"] == pytest.approx(min(ppl("a"), ppl("b")) / ppl("m"))


def test_report_files_table_metrics_and_plot_rows(tmp_path, seed):
    params = _params(tmp_path, {"m": _merge(["a", "b"])}, baseline="base")
    s = _write_metrics(tmp_path, random.Random(seed), ["m", "a", "b", "base"])
    out = write("m", params)
    retention = json.loads((out / "retention.json").read_text())
    ems = [s[n]["skills"]["exact_match"]["x"] for n in ("a", "b")]
    assert retention["skills"]["x"] == pytest.approx(s["m"]["skills"]["exact_match"]["x"] / max(ems))
    rows = json.loads((out / "scores.json").read_text())["scores"]
    assert len(rows) == 3 * 4  # three tasks, four models (the baseline included)
    assert {"task": "text/z", "model": "base (base)", "score": s["base"]["text"]["perplexity"]["z"],
            "label": "text/z: base (base)"} in rows
    table = (out / "report.md").read_text()
    assert "| skills/x | exact_match | " in table and "m (merge) | a (parent) | b (parent) | base (base)" in table


def test_missing_metrics_name_the_stage(tmp_path):
    from stages.common.errors import EvalError

    params = _params(tmp_path, {"m": _merge(["a", "b"])})
    with pytest.raises(EvalError, match="eval/m.json.*eval-m writes them"):
        compare("m", params)


def test_base_of_recipe_then_shared_parent_base_then_baseline(tmp_path):
    params = _params(tmp_path, {"t1": _merge(["a", "base"], base="base"), "t2": _merge(["b", "base"], base="base"),
                                "soup": _merge(["a", "b"]), "mix": _merge(["t1", "t2"]), "odd": _merge(["t1", "soup"])},
                     baseline="c")
    assert base_of("t1", params) == "base"
    assert base_of("mix", params) == "base"  # both parents were built on 'base'
    assert base_of("soup", params) == "c"
    assert base_of("odd", params) == "c"  # its parents' bases differ ('base', and 'c' for the soup)


def test_sweep_curve_has_one_row_per_value_with_every_task(tmp_path, seed):
    from stages.evaluate.sweep import curve

    rng = random.Random(seed)
    values = sorted(rng.random() for _ in range(3))
    params = _params(tmp_path, {}) | {"sweeps": {"ta": {"key": "parameters.lambda", "values": values,
                                                        "recipes": ["ta-1", "ta-2", "ta-3"]}}}
    s = _write_metrics(tmp_path, rng, ["ta-1", "ta-2", "ta-3"])
    rows = json.loads(curve("ta", params).read_text())["sweep"]
    assert [r["value"] for r in rows] == values
    for row, name in zip(rows, ("ta-1", "ta-2", "ta-3")):
        assert row == {"value": row["value"], "recipe": name, "skills/x": s[name]["skills"]["exact_match"]["x"],
                       "skills/y": s[name]["skills"]["exact_match"]["y"], "text/z": s[name]["text"]["perplexity"]["z"]}
    assert "| parameters.lambda | recipe | skills/x |" in (tmp_path / "reports/ta/sweep.md").read_text()


def test_leaderboard_lists_every_evaluated_model_with_suite_means(tmp_path, seed):
    from stages.evaluate.report import leaderboard

    rng = random.Random(seed)
    params = _params(tmp_path, {"m": _merge(["a", "b"])})
    counts = {t: rng.randint(3, 40) for t in ("x", "y")}
    for t, n in counts.items():
        (tmp_path / f"{t}.jsonl").write_text("".join(json.dumps({"prompt": str(i), "answer": "a"}) + "\n"
                                                     for i in range(n)))
    params["evaluate"]["suites"] = {"skills": {"kind": "exact_match", "tasks": {
        t: {"validation": "unread.jsonl", "test": str(tmp_path / f"{t}.jsonl")} for t in counts}}}
    s = _write_metrics(tmp_path, rng, ["a", "m"])  # b and c are not evaluated yet
    held = {"x": rng.random(), "y": rng.random()}
    (tmp_path / "eval" / "m.validation.json").write_text(json.dumps({"skills": {"exact_match": held}}))
    lines = leaderboard(params).splitlines()
    assert lines[0] == (f"| model | skills/x | skills/y | text/z | skills mean ± SE (n = {sum(counts.values())}) "
                        "| skills validation mean |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| a", "| m"]
    x, y = (s["m"]["skills"]["exact_match"][t] for t in ("x", "y"))
    se = math.sqrt(x * (1 - x) / counts["x"] + y * (1 - y) / counts["y"]) / 2
    assert lines[3].endswith(f" | {(x + y) / 2:.4g} ± {se:.3f} | {(held['x'] + held['y']) / 2:.4g} |")
    assert lines[2].endswith(" | n/a |")  # a has no validation scores
