"""The metrics files of artifacts/eval/NAME.json: {suite: {kind: {task: score}}}, one per model."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import EvalError

HIGHER_IS_BETTER = {"perplexity": False, "exact_match": True, "lm_eval": True}  # the suite kinds


def metrics_path(name: str, params: dict) -> Path:
    return Path(params["artifacts"]) / "eval" / f"{name}.json"


def load_metrics(name: str, params: dict) -> dict:
    path = metrics_path(name, params)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvalError(f"{path}: the metrics of '{name}' are missing or unreadable ({exc}); "
                        f"its stage eval-{name} writes them") from None
