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
    description: str = ""


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
    description: str = ""


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
    """The composed project: conf/config.yaml plus every file of conf/models and conf/merges."""

    paths: Paths = field(default_factory=Paths)
    demo: Demo = field(default_factory=Demo)
    build: Optional[List[str]] = None  # recipes to build (with what they need); None: all of them
    models: Dict[str, ModelSource] = field(default_factory=dict)
    merges: Dict[str, MergeRecipe] = field(default_factory=dict)


def register() -> None:
    ConfigStore.instance().store(name="mergeforge_schema", node=Config)
