"""evaluate stage: run every suite of conf/eval on one model or merge, write its metrics to
artifacts/eval/NAME.json (DVC metrics) and link them to the model's MLflow record.

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
from ..common.stage_cli import is_model, run_stage
from .suites import load, run_suite


def evaluate(name: str, params: dict) -> Path:
    suites = params["evaluate"]["suites"]
    out = metrics_file(name, params)
    tracking.connect()
    model, tok = load(model_dir(name, params))
    metrics = {s: {suite["kind"]: run_suite(s, suite, model, tok)} for s, suite in sorted(suites.items())}
    tracking.log_metrics(name, tracking.ensure(name, params), metrics, suites)
    write_json(out, metrics)
    return out


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "stages.evaluate", "model or merge", is_model,
                     lambda name, params: f"evaluated {name}: {evaluate(name, params)}", (EvalError, LineageError))
