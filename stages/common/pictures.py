"""Pictures a person can look at with no browser, plugin or network: PNG files drawn with
matplotlib, for report.md, sweep.md, a search's folder and the model card.

Each function returns a matplotlib Figure (tests read its annotations back) and `save` writes it.
The same inputs give the same bytes: matplotlib's own style (not the user's matplotlibrc), a fixed
width and dpi, a height that follows the number of bars, and no version stamp in the file; so a
rebuild that changes no number leaves git and DVC with nothing to see. matplotlib is imported
inside the functions: the CLI stays fast.
"""
from __future__ import annotations

import io
import math
from contextlib import contextmanager
from pathlib import Path

from .atomic import write_bytes
from .metrics import HIGHER_IS_BETTER

DPI = 100
WIDTH = 8.0  # inches: 800 pixels at DPI
MERGE = "#c0392b"  # the merge: one strong colour in every picture
PARENTS = ["#7fa7cf", "#8fbf8f", "#d9b27c", "#b39ddb", "#d99ab8", "#7fc4c4"]  # muted, told apart
BASE = "#a6a6a6"
LINES = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def value_text(value: float | None) -> str:
    """A score as it is written on its bar: ".682", "1.00", "12.4", "n/a"."""
    if value is None:
        return "n/a"
    if abs(value) < 1:
        return f"{value:.3f}".replace("0.", ".", 1)
    return f"{value:.{max(0, 2 - int(math.log10(abs(value))))}f}"


def metric_label(kind: str) -> str:
    return f"{kind} ({'higher' if HIGHER_IS_BETTER[kind] else 'lower'} is better)"


@contextmanager
def _style():
    """matplotlib's default style whatever the user's matplotlibrc says, so the bytes depend only on
    the data (and matplotlib's version)."""
    import matplotlib.style

    with matplotlib.style.context("default"):
        yield


def _figure(height: float, rows: int = 1, ratios: list[float] | None = None):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False, gridspec_kw={"height_ratios": ratios or [1] * rows})[:, 0]


def save(fig, path: Path) -> Path:
    """Write the figure as a PNG, atomically, without matplotlib's version in the file."""
    buffer = io.BytesIO()
    with _style():
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    write_bytes(path, buffer.getvalue())
    return path


def _colour(role: str, index: int) -> str:
    return MERGE if role == "merge" else BASE if role == "base" else PARENTS[index % len(PARENTS)]


def scores(name: str, comparison: dict):
    """Per task, one bar for the merge and one for each parent and the base (the comparison of
    stages/evaluate/report.py compare), each with its value; one panel per metric, since accuracy
    and perplexity share no scale. Each value's annotation has the row's label of scores.json as gid."""
    models = comparison["models"]
    kinds = sorted({t["kind"] for t in comparison["tasks"]})
    panels = [[t for t in comparison["tasks"] if t["kind"] == kind] for kind in kinds]
    heights = [len(tasks) * (0.25 * len(models) + 0.3) + 0.7 for tasks in panels]
    with _style():
        fig, axes = _figure(sum(heights) + 0.9, len(kinds), heights)
        step = 0.8 / len(models)
        for ax, kind, tasks in zip(axes, kinds, panels):
            for i, (role, model) in enumerate(models):
                legend = f"{model} ({role})"
                ys = [j + (i - (len(models) - 1) / 2) * step for j in range(len(tasks))]
                values = [t["scores"][model] for t in tasks]
                ax.barh(ys, [v or 0 for v in values], height=step * 0.9, color=_colour(role, i), label=legend,
                        edgecolor="black" if role == "merge" else "none")
                for t, y, value in zip(tasks, ys, values):
                    ax.annotate(value_text(value), (value or 0, y), xytext=(3, 0), textcoords="offset points",
                                va="center", fontsize=8, fontweight="bold" if role == "merge" else "normal",
                                gid=f"{t['suite']}/{t['task']}: {legend}")
            ax.set_yticks(range(len(tasks)), [f"{t['suite']}/{t['task']}" for t in tasks])
            ax.invert_yaxis()  # the first task on top, the merge first in each group
            ax.margins(x=0.12)
            ax.set_xlabel(metric_label(kind))
            ax.set_ylabel("task")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=9)
        fig.suptitle(f"{name}: the merge against its parents and base, per task")
    return fig


def retention(name: str, comparison: dict):
    """Per task, the merge's retention (score / the best parent's; perplexity: the best parent's /
    the merge's) with its value, and a line at 1.0: the best parent's level. Each value's
    annotation has "suite/task" as gid."""
    tasks = comparison["tasks"]
    with _style():
        fig, (ax,) = _figure(len(tasks) * 0.45 + 1.6)
        for j, t in enumerate(tasks):
            value = t["retention"]
            ax.barh(j, value or 0, height=0.6, color=MERGE)
            ax.annotate(value_text(value), (value or 0, j), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=8, gid=f"{t['suite']}/{t['task']}")
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="1.0: the best parent's level")
        ax.set_yticks(range(len(tasks)), [f"{t['suite']}/{t['task']}" for t in tasks])
        ax.invert_yaxis()
        ax.margins(x=0.12)
        ax.set_xlabel("retention: merge / best parent (perplexity: best parent / merge)")
        ax.set_ylabel("task")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{name}: retention per task")
    return fig


def sweep(name: str, key: str, rows: list[dict], kinds: dict[str, str]):
    """Each task's score against the swept value (the rows of stages/evaluate/sweep.py), a colour
    and a marker per task, one panel per metric. `kinds`: {suite/task: metric kind}."""
    values = [r["value"] for r in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = values if numeric else list(range(len(values)))
    metrics = sorted(set(kinds.values()))
    with _style():
        fig, axes = _figure(3.2 * len(metrics) + 0.6, len(metrics))
        for ax, kind in zip(axes, metrics):
            for i, task in enumerate(t for t in kinds if kinds[t] == kind):
                ax.plot(xs, [r[task] for r in rows], color=LINES[i % len(LINES)], marker=MARKERS[i % len(MARKERS)],
                        label=task)
            if not numeric:
                ax.set_xticks(xs, [str(v) for v in values])
            ax.set_xlabel(key)
            ax.set_ylabel(f"score: {metric_label(kind)}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{name}: score against {key}")
    return fig


def search(name: str, rows: list[dict]):
    """A search's validation objective per trial (points; a pruned trial hollow, at the value it was
    stopped at) and the best so far (a line), from the rows of its trials.json."""
    done = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] != "complete" and r["objective"] is not None]
    lead = [r for r in rows if r["best"] is not None]
    with _style():
        fig, (ax,) = _figure(4.5)
        ax.scatter([r["trial"] for r in done], [r["objective"] for r in done], color=LINES[0], zorder=3,
                   label="trial")
        if pruned:
            ax.scatter([r["trial"] for r in pruned], [r["objective"] for r in pruned], facecolors="none",
                       edgecolors=BASE, zorder=3, label="trial pruned (its early value)")
        ax.step([r["trial"] for r in lead], [r["best"] for r in lead], where="post", color=MERGE, linewidth=2,
                label="best so far")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("trial")
        ax.set_ylabel("validation objective")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        ax.set_title(f"{name}: validation objective per trial")
    return fig
