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
class AdapterSource:
    """A PEFT LoRA adapter that a model applies to its checkpoint (conf/models/NAME.yaml `adapter:`)."""

    source: str = MISSING  # "local" or "hub"
    path: Optional[str] = None  # local: the adapter's directory (relative to the project root)
    repo_id: Optional[str] = None  # hub: "org/name"
    revision: str = "main"  # hub: a branch, tag or commit sha


@dataclass
class ModelSource:
    """conf/models/NAME.yaml: where a source checkpoint comes from."""

    source: str = MISSING  # "local" or "hub"
    path: Optional[str] = None  # local: a directory (relative to the project root)
    repo_id: Optional[str] = None  # hub: "org/name"
    revision: str = "main"  # hub: a branch, tag or commit sha
    license: Optional[str] = None  # what merges inherit on publication (a hub model's card may say)
    adapter: Optional[AdapterSource] = None  # the model is this checkpoint with a LoRA adapter merged in
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
    modules: Optional[Dict[str, Any]] = None  # per module of a multimodal architecture: models or slices, parameters
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
class Split:
    """How a task given as one data file splits in two: a seeded shuffle of its items, the first
    `validation` share for searches to tune on, the rest for the test scores everything reports."""

    validation: float = MISSING  # the share of items, between 0 and 1
    seed: int = 0


@dataclass
class EvalSuite:
    """conf/eval/NAME.yaml: one evaluation suite, run on every model and merge (stages/evaluate/suites.py)."""

    kind: str = MISSING  # perplexity | exact_match | lm_eval
    # task name -> {validation: FILE, test: FILE}, or one FILE (split by `split`, else test only):
    # text, prompt/answer JSONL, lm-eval task YAML
    tasks: Dict[str, Any] = MISSING
    split: Optional[Split] = None
    limit: Optional[int] = None  # score only the first N documents or cases of each task
    batch_size: int = 16
    max_length: int = 1024  # perplexity: tokens per scored window
    max_new_tokens: int = 32  # exact_match: the generation budget
    metric: str = "acc,none"  # lm_eval: which reported metric is the score
    description: str = ""


@dataclass
class Objective:
    """What a search maximises (minimises, for perplexity): one suite's validation scores."""

    suite: str = MISSING  # a suite of conf/eval whose tasks have a validation split
    aggregate: str = "mean"  # mean | min | max over the suite's tasks
    weights: Dict[str, float] = field(default_factory=dict)  # task -> weight: a weighted mean instead


@dataclass
class Budget:
    """When a search stops: after `trials` finished trials, or `minutes` (one or both)."""

    trials: Optional[int] = None
    minutes: Optional[float] = None


@dataclass
class Pruner:
    """Stop a trial after a first share of the validation items when it scores below `percentile`
    of the trials so far at that point (after `startup` finished trials)."""

    fraction: float = 0.25
    percentile: float = 50.0
    startup: int = 5


@dataclass
class Search:
    """conf/searches/NAME.yaml: an Optuna study over a recipe's numbers (stages/search); its best
    recipe becomes the merge NAME."""

    recipe: Dict[str, Any] = MISSING  # mergekit syntax; any value may be {search: [LOW, HIGH]} or {choice: [...]}
    objective: Objective = MISSING
    budget: Budget = field(default_factory=Budget)
    sampler: str = "tpe"  # tpe | cmaes | gp | random | grid
    seed: int = 0  # the sampler's, and the draws of the random methods
    constraints: Optional[List[Any]] = None  # [{sum: [DIMENSION, ...], equals: 1}]
    pruner: Optional[Pruner] = None
    device: str = "cpu"  # where trials merge: cpu, cuda or cuda:N
    in_memory: Optional[bool] = None  # trials merge into memory (null: where the models fit) or through files
    storage: Optional[str] = None  # an Optuna storage URL (default: a journal file under .mergeforge/searches)
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
class Export:
    """conf/exports/NAME.yaml: a way out of the build for one merge: a GGUF file with an Ollama
    Modelfile and LM Studio's layout (kind gguf), or a PEFT LoRA adapter over a base (kind lora)."""

    model: str = MISSING  # a recipe of conf/merges (or a search)
    kind: str = MISSING  # gguf | lora
    type: str = "q8_0"  # gguf: the tensors' type, f32 | f16 | bf16 | q8_0
    publisher: str = "mergeforge"  # gguf: LM Studio's folder, PUBLISHER/MODEL/FILE.gguf
    base: Optional[str] = None  # lora: the model it applies to (default: the recipe's base_model)
    rank: int = 16  # lora: of every module (smaller modules get their full rank)
    embeddings: Optional[str] = None  # lora: null, lora (factored) or full (copied whole)
    norms: bool = False  # lora: copy changed norms whole
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
    (as `suites`), conf/publish, conf/searches and conf/exports."""

    paths: Paths = field(default_factory=Paths)
    demo: Demo = field(default_factory=Demo)
    build: Optional[List[str]] = None  # recipes to build (with what they need); None: all of them
    evaluate: Evaluate = field(default_factory=Evaluate)
    models: Dict[str, ModelSource] = field(default_factory=dict)
    merges: Dict[str, MergeRecipe] = field(default_factory=dict)
    suites: Dict[str, EvalSuite] = field(default_factory=dict)
    publish: Dict[str, PublishTarget] = field(default_factory=dict)
    searches: Dict[str, Search] = field(default_factory=dict)
    exports: Dict[str, Export] = field(default_factory=dict)


def register() -> None:
    ConfigStore.instance().store(name="mergeforge_schema", node=Config)
