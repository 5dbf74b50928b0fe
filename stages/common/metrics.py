"""The metrics files of artifacts/eval/NAME.json: {suite: {kind: {task: score}}}, one per model."""
from __future__ import annotations

import json

from .errors import EvalError
from .layout import metrics_file

HIGHER_IS_BETTER = {"perplexity": False, "exact_match": True, "lm_eval": True}  # the suite kinds


def load_metrics(name: str, params: dict) -> dict:
    path = metrics_file(name, params)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvalError(f"{path}: the metrics of '{name}' are missing or unreadable ({exc}); "
                        f"its stage eval-{name} writes them") from None
