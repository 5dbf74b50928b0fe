"""The metrics files of artifacts/eval/NAME.json (test split) and NAME.validation.json:
{suite: {kind: {task: score}}}, one per model and split."""
from __future__ import annotations

import json

from .errors import EvalError
from .layout import metrics_file

HIGHER_IS_BETTER = {"perplexity": False, "exact_match": True, "lm_eval": True}  # the suite kinds


def load_metrics(name: str, params: dict, split: str = "test") -> dict:
    path = metrics_file(name, params, split)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvalError(f"{path}: the metrics of '{name}' are missing or unreadable ({exc}); "
                        f"its stage eval-{name} writes them") from None
