"""Test session setup: never touch the network; tiny checkpoints built fresh per test."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tiny import fresh_seed, llama_state, write_family  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """MERGEFORGE_TEST_SEED replays hypothesis' draws too (it becomes --hypothesis-seed)."""
    if os.environ.get("MERGEFORGE_TEST_SEED") and getattr(config.option, "hypothesis_seed", None) is None:
        config.option.hypothesis_seed = os.environ["MERGEFORGE_TEST_SEED"]


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test's seed, fresh per test and printed (pytest shows it for a failing test);
    MERGEFORGE_TEST_SEED=N replays a failing draw. It seeds torch, numpy and random, so a test
    that draws without asking for it is replayed too."""
    value = fresh_seed()
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value


@pytest.fixture
def family(tmp_path, seed):
    """A base and three fine-tunes of it (float32, the third one sharded) on disk."""
    return write_family(tmp_path, llama_state(seed=seed), seed)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An MLflow sqlite DB migrated once per session (migrations take seconds); tests copy it."""
    from stages.common import tracking

    root = tmp_path_factory.mktemp("mlflow-template")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    tracking.connect(root)
    return root / "mlflow.db"


@pytest.fixture
def mlflow_store(tmp_path, mlflow_template, monkeypatch) -> str:
    """A private copy of the template store, as MLFLOW_TRACKING_URI; the test runs in tmp_path."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri
