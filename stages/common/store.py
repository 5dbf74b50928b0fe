"""The MLflow store a project records into, checked before MLflow opens it: MLflow retries an
absent server for minutes, silently turns an empty or foreign sqlite file into a fresh store (losing
the lineage history), and keeps absolute artifact paths, so a copied or moved project would write
into the folder it came from.

A sqlite store keeps its artifacts in `mlartifacts/` beside its file; when the file has moved, the
paths recorded in it are moved with it before MLflow opens it.
"""
from __future__ import annotations

import http.client
import os
import sqlite3
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from contextlib import closing
from pathlib import Path

from .errors import LineageError

EXPERIMENT = "mergeforge"
# MLflow's defaults (7 retries with backoff, 120 s per request) spend minutes on a dead server
# before failing; these make a server that dies mid-run fail within a minute. A user's own
# setting wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
PROBE_TIMEOUT_S = 5
SQLITE_HEADER = b"SQLite format 3\x00"
MLFLOW_TABLES = ("alembic_version", "experiments")
ARTIFACTS = "mlartifacts"
# every column where MLflow keeps an artifact path (file:// URIs, or plain paths for the default experiment)
PATH_COLUMNS = {"experiments": "artifact_location", "runs": "artifact_uri", "logged_models": "artifact_location",
                "model_versions": "storage_location"}


def shown_uri(uri: str) -> str:
    """The URI without credentials (a team server URI may carry user:password@)."""
    scheme, sep, rest = uri.partition("://")
    return scheme + sep + rest.rpartition("@")[2] if sep else uri


def sqlite_file(uri: str) -> Path | None:
    """The file of a sqlite store URI (None for other stores and in-memory ones)."""
    if uri.partition(":")[0].lower() != "sqlite":
        return None
    from sqlalchemy.engine import make_url  # the parser MLflow's store uses: same file

    database = make_url(uri).database
    return Path(database).absolute() if database and database != ":memory:" else None


def artifact_root(uri: str, root: Path) -> str:
    """Where a new experiment keeps its artifacts: beside a sqlite store's file, else in the project."""
    db = sqlite_file(uri)
    return ((db.parent if db else root) / ARTIFACTS).as_uri()


def check_store(uri: str, create: bool = True) -> None:
    """Fail before MLflow does on a store it cannot use, and move a moved sqlite store's paths."""
    scheme = uri.partition(":")[0].lower()
    if scheme in ("http", "https"):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        check_server(uri)
    elif scheme == "sqlite" and (db := sqlite_file(uri)) is not None:
        check_sqlite(db, create)
        if db.exists():
            relocate(db)


def check_server(uri: str) -> None:
    """Any HTTP answer to /health within seconds means a server is there (its own errors, such as
    a 401, come later from MLflow with their reason); silence or a refused connection is an error."""
    url = shown_uri(uri).rstrip("/") + "/health"  # credentials stay out of the probe and the message
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE  # reachability only: MLflow verifies
    try:
        urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S, context=tls).close()
    except urllib.error.HTTPError:
        pass
    except (OSError, http.client.HTTPException) as exc:  # refused, timed out, TLS failed, not HTTP
        reason = getattr(exc, "reason", exc)
        raise LineageError(f"MLflow at {shown_uri(uri)}: cannot reach the tracking server ({type(reason).__name__}: "
                           f"{reason}): start it, or fix MLFLOW_TRACKING_URI (or unset it to record lineage in the "
                           "project's mlflow.db)") from None


def check_sqlite(path: Path, create: bool = True) -> None:
    """An existing store must be an MLflow sqlite DB (read-only check); a missing one is a first run
    (or, for a reader, an error)."""
    if not path.exists():
        if not create:
            raise LineageError(f"no MLflow store at {path}: run in a project's root after `dvc repro`, or set "
                               "MLFLOW_TRACKING_URI")
        print(f"creating a new MLflow store at {path}", file=sys.stderr)
        return
    fix = "restore it from a backup, or delete it to start a new history"
    try:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
        if not header:
            problem = "is empty (0 bytes)"
        elif header != SQLITE_HEADER:
            problem = "is not an SQLite database (corrupt or overwritten)"
        else:
            tables = table_names(path)
            missing = [t for t in MLFLOW_TABLES if t not in tables]
            if not missing:
                return
            problem = f"is an SQLite database but not an MLflow store (no {', '.join(missing)} table)"
            fix = "move it away, or set MLFLOW_TRACKING_URI to the store you meant"
    except (OSError, sqlite3.Error) as exc:
        problem = f"cannot be read ({type(exc).__name__}: {exc})"
        fix = "check its permissions, or restore it from a backup"
    raise LineageError(f"MLflow store {path} {problem}: {fix}")


def table_names(path: Path) -> set[str]:
    """The tables of a sqlite file, read without writing to it; unless a process was killed while
    writing it (a hot `-journal` beside it), which only a writer may roll back, as SQLite requires."""
    query = "SELECT name FROM sqlite_master WHERE type = 'table'"
    try:
        with closing(sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)) as db:
            return {row[0] for row in db.execute(query)}
    except sqlite3.OperationalError:
        if not Path(f"{path}-journal").exists():
            raise
    with closing(sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=rw", uri=True)) as db:
        return {row[0] for row in db.execute(query)}


def relocate(db: Path) -> None:
    """When the store's file is no longer in the folder its experiment's artifacts were put beside
    (the project was copied or moved, with its mlartifacts/), point every recorded artifact path at
    the folder beside the file now. Nothing is read from or written to the old folder."""
    here = db.parent.resolve() / ARTIFACTS
    with closing(sqlite3.connect(db, timeout=60)) as conn:
        row = conn.execute("SELECT artifact_location FROM experiments WHERE name = ?", (EXPERIMENT,)).fetchone()
        if row is None or not row[0] or not row[0].startswith("file://") or not row[0].endswith("/" + ARTIFACTS):
            return  # no experiment yet, or one whose artifacts live elsewhere on purpose (a server, a bucket)
        old = Path(urllib.parse.unquote(urllib.parse.urlparse(row[0]).path))
        if old == here:
            return
        moves = [(old.as_uri(), here.as_uri()), (str(old.parent), str(here.parent))]  # URIs, then plain paths
        with conn:  # one transaction: a reader sees the old paths or the new ones
            for table, column in PATH_COLUMNS.items():
                if column not in {c[1] for c in conn.execute(f"PRAGMA table_info({table})")}:
                    continue  # a store from an MLflow that did not have it
                for before, after in moves:
                    conn.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                 f"WHERE substr({column}, 1, ?) = ? AND substr({column}, ? , 1) IN ('/', '')",
                                 (after, len(before) + 1, len(before), before, len(before) + 1))
    print(f"MLflow store {db} was moved: its artifact paths now point into {here}", file=sys.stderr)
