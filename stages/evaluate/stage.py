"""evaluate stage: run every suite of conf/eval on one model or merge, write its metrics to
artifacts/eval/NAME.json (the test split: DVC metrics) and NAME.validation.json (where suites have
a validation split, so a search's overfitting shows beside the test scores) and link them to the
model's MLflow record.

MLflow is opened before the model is loaded and written before the metrics file, so an unreachable
store fails the stage early and leaves no metrics behind.

    python -m stages.evaluate NAME
"""
from __future__ import annotations

from pathlib import Path

from ..common import tracking
from ..common.atomic import write_json
from ..common.errors import EvalError, LineageError
from ..common.layout import metrics_file, model_dir
from ..common.splits import split_names
from ..common.stage_cli import is_model, run_stage
from .suites import load, run_suite


def evaluate(name: str, params: dict) -> Path:
    suites = params["evaluate"]["suites"]
    tracking.connect()
    model, tok = load(model_dir(name, params))
    model_id = tracking.ensure(name, params)
    written = {}
    for split in split_names(suites):
        metrics = {s: {suite["kind"]: scores} for s, suite in sorted(suites.items())
                   if (scores := run_suite(s, suite, model, tok, split))}
        tracking.log_metrics(name, model_id, metrics, suites, split)
        written[split] = metrics
    for split, metrics in written.items():
        write_json(metrics_file(name, params, split), metrics)
    return metrics_file(name, params)


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "stages.evaluate", "model or merge", is_model,
                     lambda name, params: f"evaluated {name}: {evaluate(name, params)}", (EvalError, LineageError))
