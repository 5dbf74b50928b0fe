"""Structured-config schemas of conf/: what each file may say, checked by Hydra at compose time.

Registered in Hydra's ConfigStore as `mergeforge_schema`; conf/config.yaml lists it first in its
defaults, so every key of every file is typed and a typo or wrong type fails with its full key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelSource:
    """conf/models/NAME.yaml: where a source checkpoint comes from."""

    source: str = MISSING  # "local" or "hub"
    path: Optional[str] = None  # local: a directory (relative to the project root)
    repo_id: Optional[str] = None  # hub: "org/name"
    revision: str = "main"  # hub: a branch, tag or commit sha
    license: Optional[str] = None  # what merges inherit on publication (a hub model's card may say)
    description: str = ""


@dataclass
class Sweep:
    """Build a recipe once per value of one of its keys; NAME-1, NAME-2... are the recipes built."""

    key: str = MISSING  # a dotted path into the recipe, e.g. parameters.lambda or models.0.parameters.weight
    values: List[Any] = MISSING


@dataclass
class MergeRecipe:
    """conf/merges/NAME.yaml: a mergekit recipe whose models are names of conf/models files or of
    other recipes (a merge of merges)."""

    merge_method: str = MISSING
    models: Optional[List[Any]] = None
    slices: Optional[List[Any]] = None
    base_model: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[Dict[str, Any]] = None
    chat_template: Optional[str] = None
    seed: int = 0  # draws of the random methods (dare_*, della*)
    device: str = "cpu"  # where the math runs: cpu, cuda or cuda:N (same entries kept; last bits may differ)
    sweep: Optional[Sweep] = None  # build the recipe once per value of one key (stages/compose/sweeps.py)
    description: str = ""


@dataclass
class EvalSuite:
    """conf/eval/NAME.yaml: one evaluation suite, run on every model and merge (stages/evaluate/suites.py)."""

    kind: str = MISSING  # perplexity | exact_match | lm_eval
    tasks: Dict[str, str] = MISSING  # task name -> data file: text, prompt/answer JSONL, lm-eval task YAML
    limit: Optional[int] = None  # score only the first N documents or cases of each task
    batch_size: int = 16
    max_length: int = 1024  # perplexity: tokens per scored window
    max_new_tokens: int = 32  # exact_match: the generation budget
    metric: str = "acc,none"  # lm_eval: which reported metric is the score
    description: str = ""


@dataclass
class Gates:
    """Thresholds a model must pass to be published. Keys are 'suite/task', or '*' for every task."""

    min_retention: Dict[str, float] = field(default_factory=dict)  # merge / best parent (see stages/evaluate/report.py)
    min_score: Dict[str, float] = field(default_factory=dict)
    max_score: Dict[str, float] = field(default_factory=dict)  # e.g. a perplexity ceiling


@dataclass
class PublishTarget:
    """conf/publish/NAME.yaml: a hub repo that receives one merge when it passes its gates."""

    model: str = MISSING  # a recipe of conf/merges
    repo_id: str = MISSING  # "org/name"
    push: bool = False  # false: a dry run (the staged folder and a receipt only)
    private: bool = True  # when the repo is created
    gates: Gates = field(default_factory=Gates)
    alias: str = "candidate"  # the MLflow registry alias a model that passes its gates gets
    description: str = ""


@dataclass
class Evaluate:
    baseline: Optional[str] = None  # the model merges without a base_model are compared with


@dataclass
class Paths:
    artifacts: str = "artifacts"  # fetched models in artifacts/models, merges in artifacts/merges


@dataclass
class Demo:
    """The offline demo: a stage trains a tiny base and experts into `out` (models point there)."""

    enabled: bool = True
    out: str = "artifacts/demo"


@dataclass
class Config:
    """The composed project: conf/config.yaml plus every file of conf/models, conf/merges, conf/eval
    (as `suites`) and conf/publish."""

    paths: Paths = field(default_factory=Paths)
    demo: Demo = field(default_factory=Demo)
    build: Optional[List[str]] = None  # recipes to build (with what they need); None: all of them
    evaluate: Evaluate = field(default_factory=Evaluate)
    models: Dict[str, ModelSource] = field(default_factory=dict)
    merges: Dict[str, MergeRecipe] = field(default_factory=dict)
    suites: Dict[str, EvalSuite] = field(default_factory=dict)
    publish: Dict[str, PublishTarget] = field(default_factory=dict)


def register() -> None:
    ConfigStore.instance().store(name="mergeforge_schema", node=Config)
