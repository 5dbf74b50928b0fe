"""Test session setup: never touch the network; tiny checkpoints built fresh per test."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny import llama_state, write_family  # noqa: E402


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test, printed on failure; MERGEFORGE_TEST_SEED=N replays a failing draw."""
    value = int(os.environ.get("MERGEFORGE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"random seed: {value}")
    torch.manual_seed(value)
    return value


@pytest.fixture
def family(tmp_path, seed):
    """A base and three fine-tunes of it (float32, the third one sharded) on disk."""
    return write_family(tmp_path, llama_state(seed=seed), seed)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An MLflow sqlite DB migrated once per session (migrations take seconds); tests copy it."""
    from stages import tracking

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
