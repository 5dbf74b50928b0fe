"""The pictures of reports, sweeps and searches: PNG files of the expected size that show the
values of the files beside them, the same bytes when drawn again (whatever the user's matplotlib
settings), other bytes when a score changes."""
import json
import random
import struct

import pytest

from stages.common import pictures
from stages.evaluate.report import compare, write


def _project(tmp_path, rng):
    """A merge m of parents a and b on base, with random scores on two metrics."""
    params = {"artifacts": str(tmp_path),
              "models": {n: {"source": "local", "path": n} for n in ("base", "a", "b")},
              "merges": {"m": {"recipe": {"merge_method": "ties", "base_model": "base"}, "seed": 0, "device": "cpu",
                               "inputs": {n: n for n in ("a", "b", "base")}}},
              "evaluate": {"baseline": None, "suites": {}}, "publish": {}}
    for name in ("m", "a", "b", "base"):
        _scores(tmp_path, name, {"skills": {"exact_match": {t: rng.random() for t in ("x", "y", "z")}},
                                 "text": {"perplexity": {"w": 1 + 20 * rng.random()}}})
    return params


def _scores(tmp_path, name, scores):
    (tmp_path / "eval").mkdir(exist_ok=True)
    (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(scores))


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _expected_size(fig):
    width, height = fig.get_size_inches() * pictures.DPI
    return round(width), round(height)


def _annotations(fig):
    return {text.get_gid(): text.get_text() for ax in fig.axes for text in ax.texts if text.get_gid()}


def test_the_report_pictures_show_the_values_of_its_scores_files(tmp_path, seed):
    params = _project(tmp_path, random.Random(seed))
    out = write("m", params)
    comparison = compare("m", params)
    rows = json.loads((out / "scores.json").read_text())["scores"]
    bars = pictures.scores("m", comparison)
    assert _annotations(bars) == {r["label"]: pictures.value_text(r["score"]) for r in rows}
    kept = json.loads((out / "retention.json").read_text())
    line = pictures.retention("m", comparison)
    assert _annotations(line) == {f"{suite}/{task}": pictures.value_text(value)
                                  for suite, tasks in kept.items() for task, value in tasks.items()}
    for fig, path in ((bars, out / "scores.png"), (line, out / "retention.png")):
        assert _png_size(path) == _expected_size(fig)
        assert pictures.save(fig, tmp_path / "again.png").read_bytes() == path.read_bytes()  # this figure, that file
    table = (out / "report.md").read_text()
    assert "](scores.png)" in table and "](retention.png)" in table
    axes = bars.axes
    assert [ax.get_xlabel() for ax in axes] == ["exact_match (higher is better)", "perplexity (lower is better)"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["skills/x", "skills/y", "skills/z"]
    legend = [t.get_text() for t in bars.legends[0].get_texts()]
    assert legend == ["m (merge)", "a (parent)", "b (parent)", "base (base)"]
    colours = [{bar.get_facecolor() for bar in bars_of} for bars_of in axes[0].containers]  # one per model
    assert [c.get_label() for c in axes[0].containers] == legend
    assert all(len(c) == 1 for c in colours) and len(set.union(*colours)) == len(colours)


def test_the_same_scores_give_the_same_bytes_and_a_changed_score_other_bytes(tmp_path, seed, monkeypatch):
    import matplotlib

    rng = random.Random(seed)
    params = _project(tmp_path, rng)
    out = write("m", params)
    first = {f: (out / f).read_bytes() for f in ("scores.png", "retention.png")}
    monkeypatch.setitem(matplotlib.rcParams, "font.size", 17)  # a user's matplotlibrc changes nothing
    monkeypatch.setitem(matplotlib.rcParams, "axes.facecolor", "yellow")
    write("m", params)
    assert {f: (out / f).read_bytes() for f in first} == first
    metrics = json.loads((tmp_path / "eval/m.json").read_text())
    metrics["skills"]["exact_match"]["y"] = (metrics["skills"]["exact_match"]["y"] + 0.5) % 1
    _scores(tmp_path, "m", metrics)
    write("m", params)
    assert all((out / f).read_bytes() != first[f] for f in first)


def test_a_sweep_picture_draws_each_task_in_its_own_colour_and_marker(tmp_path, seed):
    from stages.evaluate.sweep import curve

    rng = random.Random(seed)
    params = _project(tmp_path, rng) | {"sweeps": {"ta": {"key": "parameters.lambda", "recipes": ["ta-1", "ta-2", "ta-3"],
                                                          "values": sorted(rng.random() for _ in range(3))}}}
    for name in ("ta-1", "ta-2", "ta-3"):
        _scores(tmp_path, name, {"skills": {"exact_match": {t: rng.random() for t in ("x", "y", "z")}},
                                 "text": {"perplexity": {"w": 1 + 20 * rng.random()}}})
    rows = json.loads(curve("ta", params).read_text())["sweep"]
    png = tmp_path / "reports/ta/sweep.png"
    before = png.read_bytes()
    assert "](sweep.png)" in (tmp_path / "reports/ta/sweep.md").read_text()
    kinds = {"skills/x": "exact_match", "skills/y": "exact_match", "skills/z": "exact_match", "text/w": "perplexity"}
    fig = pictures.sweep("ta", "parameters.lambda", rows, kinds)
    assert _png_size(png) == _expected_size(fig)
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert [line.get_label() for line in lines] == list(kinds)
    assert len({line.get_color() for line in lines[:3]}) == 3 and len({line.get_marker() for line in lines[:3]}) == 3
    for line in lines:
        assert list(line.get_ydata()) == [r[line.get_label()] for r in rows]
    assert {ax.get_xlabel() for ax in fig.axes} == {"parameters.lambda"}
    assert all(ax.get_ylabel().startswith("score: ") for ax in fig.axes)
    curve("ta", params)
    assert png.read_bytes() == before


def test_a_search_picture_shows_each_trial_and_the_best_so_far(tmp_path, seed):
    rng = random.Random(seed)
    rows, lead = [], None
    for trial in range(12):
        state = "pruned" if rng.random() < 0.3 else "complete"
        value = rng.random()
        if state == "complete" and (lead is None or value > lead):
            lead = value
        rows.append({"trial": trial, "state": state, "objective": value, "best": lead})
    fig = pictures.search("s", rows)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("trial", "validation objective")
    points = [c.get_offsets().tolist() for c in ax.collections]
    assert points[0] == [[r["trial"], r["objective"]] for r in rows if r["state"] == "complete"]
    assert [tuple(p) for p in points[1:][0]] == [(r["trial"], r["objective"]) for r in rows if r["state"] == "pruned"]
    (best,) = ax.get_lines()
    assert list(best.get_ydata()) == [r["best"] for r in rows if r["best"] is not None]
    path = pictures.save(fig, tmp_path / "trials.png")
    assert _png_size(path) == _expected_size(fig)
    assert pictures.save(pictures.search("s", rows), tmp_path / "again.png").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("value, text", [(0.6824, ".682"), (0.0, ".000"), (1.0, "1.00"), (7.234, "7.23"),
                                         (12.36, "12.4"), (143.2, "143"), (None, "n/a")])
def test_values_are_written_short(value, text):
    assert pictures.value_text(value) == text
