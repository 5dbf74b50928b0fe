"""evaluate stage: run every suite of conf/eval on one model or merge, write its metrics to
artifacts/eval/NAME.json (DVC metrics) and link them to the model's MLflow record.

MLflow is opened before the model is loaded and written before the metrics file, so an unreachable
store fails the stage early and leaves no metrics behind.

    python -m stages.evaluate NAME
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import tracking
from .atomic import write_json
from .built import artifact_path
from .cli import is_model, run_stage
from .errors import EvalError, LineageError
from .evaluation import load, run_suite
from .metrics import metrics_path


def evaluate(name: str, params: dict) -> Path:
    suites = params["evaluate"]["suites"]
    out = metrics_path(name, params)
    tracking.connect()
    model, tok = load(artifact_path(name, params))
    metrics = {s: {suite["kind"]: run_suite(s, suite, model, tok)} for s, suite in sorted(suites.items())}
    tracking.log_metrics(name, tracking.ensure(name, params), metrics, suites)
    write_json(out, metrics)
    return out


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "stages.evaluate", "model or merge", is_model,
                     lambda name, params: f"evaluated {name}: {evaluate(name, params)}", (EvalError, LineageError))


if __name__ == "__main__":
    sys.exit(main())
