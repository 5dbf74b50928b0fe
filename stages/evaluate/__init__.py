"""Evaluation: the suites of conf/eval run on one model (python -m stages.evaluate NAME), a merge
compared with its parents (stages.evaluate.report) and a sweep's curve (stages.evaluate.sweep)."""
