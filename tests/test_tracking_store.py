"""connect() fails fast and loud on a tracking store it cannot use, and never replaces a damaged
sqlite store with a fresh one (that would lose the lineage history)."""
from __future__ import annotations

import os
import socket
import sqlite3
import time

import pytest

from stages.common import store, tracking
from stages.common.errors import LineageError


@pytest.fixture
def http_env(monkeypatch):
    """connect() sets MLflow's HTTP defaults in os.environ: setenv then delenv makes monkeypatch
    restore each variable as it was before the test, set or not."""
    for name in store.HTTP_DEFAULTS:
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A port that accepts TCP connections (into the listen backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def connect_error(uri: str, monkeypatch) -> tuple[str, float]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(LineageError) as err:
        tracking.connect()
    return str(err.value), time.monotonic() - start


def test_a_closed_port_fails_within_seconds(http_env, closed_port, monkeypatch):
    message, elapsed = connect_error(f"http://127.0.0.1:{closed_port}", monkeypatch)
    assert elapsed < 10
    assert f"MLflow at http://127.0.0.1:{closed_port}: cannot reach the tracking server" in message
    assert "MLFLOW_TRACKING_URI" in message  # says what to do


@pytest.mark.slow
def test_a_server_that_never_answers_fails_within_seconds(http_env, silent_server, monkeypatch):
    message, elapsed = connect_error(f"http://127.0.0.1:{silent_server}", monkeypatch)
    assert elapsed < 15
    assert f"MLflow at http://127.0.0.1:{silent_server}: cannot reach the tracking server" in message
    assert "timed out" in message


def test_credentials_in_the_uri_never_appear(http_env, closed_port, monkeypatch, capsys):
    message, _ = connect_error(f"https://alice:s3cret-pass@127.0.0.1:{closed_port}/mlflow", monkeypatch)
    assert f"https://127.0.0.1:{closed_port}/mlflow" in message
    out = capsys.readouterr()
    assert not any("alice" in text or "s3cret" in text for text in (message, out.out, out.err))


def test_mlflow_http_defaults_are_lowered_but_a_user_setting_wins(http_env, closed_port, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    connect_error(f"http://127.0.0.1:{closed_port}", monkeypatch)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == store.HTTP_DEFAULTS[
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def foreign_sqlite(path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (text TEXT)")
    db.commit()
    db.close()


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_bytes(b""), "is empty (0 bytes): restore it from a backup, or delete it"),
    (lambda p: p.write_bytes(b"<html>502 Bad Gateway</html>\n" * 40), "is not an SQLite database"),
    (foreign_sqlite, "is an SQLite database but not an MLflow store (no alembic_version, experiments table)"),
], ids=["empty", "garbage", "foreign-sqlite"])
def test_a_damaged_store_is_an_error_and_left_as_it_was(make, problem, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlflow.db"
    make(db)
    before = db.read_bytes()
    with pytest.raises(LineageError) as err:
        tracking.connect(tmp_path)
    assert str(err.value).startswith(f"MLflow store {db} {problem}")
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_a_missing_store_is_created_and_said_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlflow.db"
    tracking.connect(tmp_path)
    assert db.stat().st_size > 0
    assert f"creating a new MLflow store at {db}" in capsys.readouterr().err
    tracking.connect(tmp_path)
    assert "creating" not in capsys.readouterr().err


def test_a_valid_store_connects_to_its_experiment(mlflow_store, capsys):
    db = sqlite3.connect(mlflow_store.removeprefix("sqlite:///"))
    (recorded,) = db.execute("SELECT experiment_id FROM experiments WHERE name = ?", (store.EXPERIMENT,)).fetchone()
    db.close()
    assert tracking.connect() == str(recorded)
    assert "creating" not in capsys.readouterr().err


def test_a_relative_sqlite_uri_is_checked_where_mlflow_opens_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lineage.db").write_bytes(b"")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///lineage.db")
    with pytest.raises(LineageError, match=f"MLflow store {tmp_path / 'lineage.db'} is empty"):
        tracking.connect()


def test_a_reader_is_refused_a_missing_store_and_none_is_created(tmp_path, monkeypatch):
    """`mergeforge lineage` outside a project must not leave an empty mlflow.db behind."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(LineageError, match=f"no MLflow store at {tmp_path / 'mlflow.db'}"):
        tracking.connect(tmp_path, create=False)
    assert list(tmp_path.iterdir()) == []


def test_a_store_left_by_a_killed_writer_is_rolled_back_and_used(mlflow_store):
    """A process killed inside a write leaves a hot journal; a read-only look cannot roll it back,
    so the check opens it as MLflow would, and the store's records are as before the write."""
    import signal
    import subprocess
    import sys

    db = mlflow_store.removeprefix("sqlite:///")
    name = f"experiment-{os.getpid()}-{time.time_ns()}"
    writer = ("import os, signal, sqlite3, sys\n"
              "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "db.execute('PRAGMA cache_size=1'); db.execute('BEGIN IMMEDIATE')\n"
              "db.execute('UPDATE experiments SET name = ? WHERE name = \"Default\"', (sys.argv[2],))\n"
              "db.execute('CREATE TABLE ballast (x)')  # pages enough to spill into the file before commit\n"
              "db.executemany('INSERT INTO ballast VALUES (?)', [(os.urandom(512),)] * 2000)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", writer, db, name])
    assert proc.returncode == -signal.SIGKILL and os.path.exists(db + "-journal")
    assert tracking.connect()  # no "cannot be read"
    with sqlite3.connect(db) as conn:
        assert name not in {row[0] for row in conn.execute("SELECT name FROM experiments")}
        assert "ballast" not in {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
