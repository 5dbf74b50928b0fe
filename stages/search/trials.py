"""One trial of a search: the recipe a choice of values makes, merged and scored on the validation
split of the objective's suite (never the test split: only the validation files are opened).

Where the models fit in memory, a trial merges with the engine into tensors in memory
(mergekit_ops.merge_tensors: the engine's plan, methods and seeds) and loads them into one model
kept for the whole search; else it merges into a temporary folder, loads that and removes it.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mergekit_ops import MergeOptions, merge, merge_tensors, parse_recipe

from ..common.recipes import mergekit_body
from ..evaluate.suites import (exact_match, lm_eval_score, load, perplexity, read_cases, read_lines,
                               split_items)
from .space import Space


def recipe_for(space: Space, values: dict) -> dict:
    """The recipe (mergekit syntax, models by name) that a trial's values make."""
    return mergekit_body(space.recipe(values))


class Pruned(Exception):
    """The trial scored below the pruner's percentile on its first share of the items."""


class Trials:
    def __init__(self, name: str, spec: dict, space: Space, work: Path):
        self.name, self.spec, self.space, self.work = name, spec, space, work
        self.data = spec["objective"]["data"]
        read = read_cases if self.data["kind"] == "exact_match" else read_lines
        self.items = {task: split_items(self.data, task, "validation", read) if self.data["kind"] != "lm_eval"
                      else None for task in sorted(self.data["tasks"])}
        self.options = MergeOptions(seed=spec["seed"], device=spec["device"])
        self.checkpoints: dict = {}  # opened once, by every in-memory trial
        remove_leftovers(work)
        inputs = spec["inputs"]
        self.in_memory = spec.get("in_memory")
        if self.in_memory is None:
            self.in_memory = _fits_in_memory([Path(p) for p in inputs.values()])
        reference = spec["recipe"].get("base_model") or next(iter(_model_names(spec["recipe"])))
        self.model, self.tok = load(Path(inputs[reference])) if self.in_memory else (None, None)

    def run(self, values: dict, report=None) -> dict[str, float]:
        """{task: validation score}; `report(value)` after the pruner's first share may raise Pruned."""
        recipe = parse_recipe(recipe_for(self.space, values), f"search '{self.name}'")
        recipe.rename_models(self.spec["inputs"])
        if self.in_memory:
            state = merge_tensors(recipe, self.options, checkpoints=self.checkpoints)
            if self._load(state):
                return self._score(self.model, self.tok, report)
            self.in_memory, self.model, self.tok = False, None, None  # its shapes differ from the base's
        self.work.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"trial-{os.getpid()}-", dir=self.work))
        try:
            merge(recipe, folder / "model", self.options)
            model, tok = load(folder / "model")
            return self._score(model, tok, report)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _load(self, state: dict[str, torch.Tensor]) -> bool:
        """Copy the merged tensors into the resident model; False where they do not fit it (a
        frankenmerge's other layer count, a merged vocabulary): such a search goes through files."""
        own = self.model.state_dict()
        if set(state) - set(own) or any(own[k].shape != v.shape for k, v in state.items()):
            return False
        tied = {k for k in own if k not in state}
        if tied - {"lm_head.weight"}:
            return False
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)
        return True

    def _score(self, model, tok, report) -> dict[str, float]:
        fraction = (self.spec.get("pruner") or {}).get("fraction")
        if fraction and report is not None and self.data["kind"] != "lm_eval":
            report(self.objective({t: self._task(model, tok, t, fraction) for t in self.items}))
        return {task: self._task(model, tok, task) for task in self.items}

    def _task(self, model, tok, task: str, fraction: float | None = None) -> float:
        d, items = self.data, self.items[task]
        if fraction is not None:
            items = items[:max(1, math.ceil(fraction * len(items)))]
        if d["kind"] == "exact_match":
            return exact_match(model, tok, items, d["max_new_tokens"], d["batch_size"])
        if d["kind"] == "perplexity":
            return perplexity(model, tok, items, d["max_length"], d["batch_size"])
        return lm_eval_score(model, tok, d["tasks"][task]["validation"], d["metric"], d.get("limit"), d["batch_size"])

    def objective(self, scores: dict[str, float]) -> float:
        how = self.spec["objective"]
        if how.get("weights"):
            weights = {t: how["weights"].get(t, 1.0) for t in scores}
            return sum(weights[t] * scores[t] for t in scores) / sum(weights.values())
        values = list(scores.values())
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}[how["aggregate"]]


def remove_leftovers(work: Path) -> None:
    """Remove the trial folders of killed workers of this machine (a merge of a big model each);
    a live worker's folder, named with its pid, stays."""
    for folder in work.glob("trial-*-*") if work.is_dir() else ():
        pid = folder.name.split("-")[1]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether a process of this machine is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _model_names(recipe: dict):
    for entry in recipe.get("models") or []:
        yield entry["model"] if isinstance(entry, dict) else entry
    for piece in recipe.get("slices") or []:
        for source in piece.get("sources") or []:
            yield source["model"]


def _fits_in_memory(folders: list[Path]) -> bool:
    """Whether the inputs, a merged copy and a resident model fit in half the memory free now."""
    sizes = [sum(f.stat().st_size for f in folder.glob("*.safetensors")) for folder in folders]
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return False
    return sum(sizes) + 2 * max(sizes, default=0) < free / 2

