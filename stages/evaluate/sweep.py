"""sweep stage: the metric curve of a sweep (conf/merges/NAME.yaml with `sweep:`, expanded by
stages.compose.sweeps into NAME-1, NAME-2, ...). Writes artifacts/reports/NAME/sweep.json: one row
per value with every task's score (DVC plots draws one line per task), sweep.png, the same as a
picture (a colour and a marker per task, one panel per metric), and sweep.md, the table with the
picture.

    python -m stages.evaluate.sweep NAME
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..common import pictures
from ..common.atomic import write_json, write_text
from ..common.errors import EvalError
from ..common.layout import sweep_files
from ..common.metrics import load_metrics
from ..common.stage_cli import in_section, run_stage


def curve(name: str, params: dict) -> Path:
    sweep = params["sweeps"][name]
    rows, kinds = [], {}
    for variant, value in zip(sweep["recipes"], sweep["values"]):
        row = {"value": value, "recipe": variant}
        for suite, by_kind in sorted(load_metrics(variant, params).items()):
            for kind, scores in by_kind.items():
                row.update({f"{suite}/{task}": score for task, score in sorted(scores.items())})
                kinds.update({f"{suite}/{task}": kind for task in sorted(scores)})
        rows.append(row)
    files = sweep_files(name, params)
    write_json(files["curve"], {"sweep": rows})
    pictures.save(pictures.sweep(name, sweep["key"], rows, kinds), files["curve_png"])
    tasks = [k for k in rows[0] if k not in ("value", "recipe")]
    table = [f"# {name}: {sweep['key']} swept", "", "| " + " | ".join([sweep["key"], "recipe"] + tasks) + " |",
             "|" + "---|" * (len(tasks) + 2)]
    table += ["| " + " | ".join([str(r["value"]), r["recipe"]] + [f"{r[t]:.4g}" for t in tasks]) + " |" for r in rows]
    table += ["", f"![{name}: score against {sweep['key']}]({files['curve_png'].name})"]
    write_text(files["table"], "\n".join(table) + "\n")
    return files["curve"]


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "stages.evaluate.sweep", "sweep", in_section("sweeps"),
                     lambda name, params: f"sweep {name}: {curve(name, params)}", (EvalError,))


if __name__ == "__main__":
    sys.exit(main())
