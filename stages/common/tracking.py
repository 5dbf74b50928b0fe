"""MLflow records of every artifact: one LoggedModel per model or merge, found again by name and
content digest, with merges linked to their parents as model inputs of the run that built them.

The tracking store is MLFLOW_TRACKING_URI when set (a team server), else a sqlite DB inside the
project at an absolute path (DVC's queued experiments run in a temp copy of the repo). Records are
idempotent: an artifact whose (name, digest) is already recorded is not recorded again, and a
parent missing from the store (a fresh DB, a build restored from DVC's cache) is recorded from
params.yaml on the way. Weights are never logged: DVC stores them.
"""
from __future__ import annotations

import http.client
import os
import sqlite3
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
from contextlib import closing, contextmanager
from pathlib import Path

from .digest import directory_digest, file_sha256
from .errors import LineageError
from .layout import model_dir, parents
from .recipes import recipe_of, search_origin

EXPERIMENT = "mergeforge"
TAG = "mergeforge."
# MLflow's defaults (7 retries with backoff, 120 s per request) spend minutes on a dead server
# before failing; these make a server that dies mid-run fail within a minute. A user's own
# setting wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
PROBE_TIMEOUT_S = 5
SQLITE_HEADER = b"SQLite format 3\x00"
MLFLOW_TABLES = ("alembic_version", "experiments")


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"


def shown_uri(uri: str) -> str:
    """The URI without credentials (a team server URI may carry user:password@)."""
    scheme, sep, rest = uri.partition("://")
    return scheme + sep + rest.rpartition("@")[2] if sep else uri


@contextmanager
def mlflow_errors(what: str):
    """Any failure inside MLflow becomes a LineageError naming the store (credentials removed)."""
    try:
        yield
    except LineageError:
        raise
    except Exception as exc:  # MLflow, SQLAlchemy and HTTP clients raise unrelated types
        first = str(exc).splitlines()[0] if str(exc) else ""
        uri = shown_uri(tracking_uri())
        first = first.replace(tracking_uri(), uri)
        raise LineageError(f"MLflow at {uri}: {what}: {type(exc).__name__}: {first}") from None


def connect(root: Path | None = None, create: bool = True) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id. A reader
    (create=False) is refused a project sqlite store that does not exist yet, not given an empty one."""
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # migrations and registry chatter
    warnings.filterwarnings("ignore", module="mlflow")
    root = (root or Path.cwd()).resolve()
    uri = tracking_uri(root)
    check_store(uri, create)
    user_choice = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if user_choice is None:  # MLflow exports the URI for subprocesses: a DVC run would inherit this project's
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    with mlflow_errors("cannot open the experiment"):
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        experiment_id = (experiment.experiment_id if experiment else
                         mlflow.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri()))
        mlflow.set_experiment(experiment_id=experiment_id)
        return experiment_id


def check_store(uri: str, create: bool = True) -> None:
    """Fail before MLflow does: MLflow retries an absent server for minutes, and silently turns an
    empty or foreign sqlite file into a fresh store, losing the lineage history."""
    scheme = uri.partition(":")[0].lower()
    if scheme in ("http", "https"):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        check_server(uri)
    elif scheme == "sqlite":
        check_sqlite(uri, create)


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


def check_sqlite(uri: str, create: bool = True) -> None:
    """An existing store must be an MLflow sqlite DB (read-only check); a missing one is a first run
    (or, for a reader, an error)."""
    from sqlalchemy.engine import make_url  # the parser MLflow's store uses: same file

    database = make_url(uri).database
    if not database or database == ":memory:":
        return
    path = Path(database).absolute()
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
            ro = f"file:{urllib.parse.quote(str(path))}?mode=ro"
            with closing(sqlite3.connect(ro, uri=True)) as db:
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = [t for t in MLFLOW_TABLES if t not in tables]
            if not missing:
                return
            problem = f"is an SQLite database but not an MLflow store (no {', '.join(missing)} table)"
            fix = "move it away, or set MLFLOW_TRACKING_URI to the store you meant"
    except (OSError, sqlite3.Error) as exc:
        problem = f"cannot be read ({type(exc).__name__}: {exc})"
        fix = "check its permissions, or restore it from a backup"
    raise LineageError(f"MLflow store {path} {problem}: {fix}")


def find(name: str, digest: str | None = None):
    """The newest LoggedModel of that name (and digest), or None."""
    import mlflow

    query = f"name = '{name}'" + (f" AND tags.`{TAG}digest` = '{digest}'" if digest else "")
    with mlflow_errors(f"cannot search for model '{name}'"):
        found = mlflow.search_logged_models(filter_string=query, order_by=[{"field_name": "creation_timestamp",
                                                                             "ascending": False}],
                                            max_results=1, output_format="list")
    return found[0] if found else None


def ensure(name: str, params: dict) -> str:
    """The model id of this artifact as it is on disk now, recording it (and its parents) if new."""
    import mlflow
    from mlflow.entities import LoggedModelInput

    path = model_dir(name, params)
    digest = directory_digest(path)
    existing = find(name, digest)
    if existing is not None:
        return existing.model_id
    tags = {f"{TAG}name": name, f"{TAG}digest": digest, f"{TAG}path": str(path)}
    if experiment():  # made by `dvc exp run`: say which experiment
        tags[f"{TAG}experiment"] = experiment()
    with mlflow_errors(f"cannot record model '{name}'"):
        if name not in params["merges"]:
            tags.update({f"{TAG}{k}": str(v) for k, v in params["models"][name].items() if k != "path"})
            return mlflow.create_external_model(name=name, tags=tags).model_id
    names = parents(name, params)
    parent_ids = [ensure(p, params) for p in names]
    spec = params["merges"][name] | {"recipe": recipe_of(name, params)}
    tags.update({f"{TAG}method": spec["recipe"]["merge_method"], f"{TAG}dvc_stage": f"merge-{name}",
                 f"{TAG}git_commit": git_commit(), f"{TAG}inputs": ",".join(names)})
    origin = search_origin(name, params)
    if origin:  # which search, study and trial found its recipe (the search's run holds every trial)
        tags.update({f"{TAG}{k}": str(origin[k]) for k in ("search", "study", "trial")})
        run_ids = search_run_ids(origin["study"])
        if run_ids:
            tags[f"{TAG}search_run"] = run_ids[0]
    with mlflow_errors(f"cannot record merge '{name}'"), mlflow.start_run(run_name=f"merge-{name}", tags=tags) as run:
        mlflow.log_params(flatten({k: spec[k] for k in ("recipe", "seed", "device") if k in spec}))
        for parent_id in parent_ids:
            mlflow.log_input(model=LoggedModelInput(parent_id))
        model = mlflow.initialize_logged_model(name=name, source_run_id=run.info.run_id, tags=tags)
        mlflow.finalize_logged_model(model.model_id, "READY")
        return model.model_id


def experiment() -> str | None:
    """The name of the DVC experiment this stage runs in (`dvc exp run` sets DVC_EXP_NAME for its
    stages), or None for a plain `dvc repro`."""
    return os.environ.get("DVC_EXP_NAME") or None


def search_run_ids(study: str) -> list[str]:
    """The MLflow runs of a search's study, oldest first (one, unless two workers began it at once)."""
    import mlflow

    with mlflow_errors(f"cannot search for the run of study '{study}'"):
        runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{TAG}study` = '{study}'",
                                  output_format="list", order_by=["start_time ASC"])
    return [r.info.run_id for r in runs if r.data.tags.get(f"{TAG}dvc_stage", "").startswith("search-")
            and "mlflow.parentRunId" not in r.data.tags]  # not the merge built from it, nor a trial


def log_metrics(name: str, model_id: str, metrics: dict, suites: dict, split: str = "test") -> None:
    """One evaluation run per model and split: each score linked to the model and to the data file
    it was scored on (test scores as `suite.task.kind`, others with the split's name appended)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    suffix = "" if split == "test" else f".{split}"
    with mlflow_errors(f"cannot log the metrics of '{name}'"), mlflow.start_run(run_name=f"eval-{name}{suffix}"):
        for suite, by_kind in sorted(metrics.items()):
            for kind, scores in by_kind.items():
                for task, value in sorted(scores.items()):
                    files = suites[suite]["tasks"][task]
                    data = Path(files.get(split) or files["file"]).resolve()
                    dataset = MetaDataset(resolve_dataset_source(str(data)), name=f"{suite}/{task}{suffix}",
                                          digest=file_sha256(data)[:16])
                    mlflow.log_metric(f"{suite}.{task}.{kind}{suffix}", value, model_id=model_id, dataset=dataset)


def register(name: str, model_id: str, alias: str) -> int:
    """Register the model under its name with `alias` (kept when that model is already the
    aliased version); returns the version."""
    import mlflow

    client = mlflow.MlflowClient()
    with mlflow_errors(f"cannot register '{name}'"):
        try:
            current = client.get_model_version_by_alias(name, alias)
            if current.source == f"models:/{model_id}":
                return int(current.version)
        except Exception:  # no such model or alias yet
            pass
        version = mlflow.register_model(f"models:/{model_id}", name).version
        client.set_registered_model_alias(name, alias, version)
        return int(version)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(tree, prefix: str = "") -> dict[str, str]:
    """Nested dicts and lists as MLflow params: {'recipe.models.0.model': 'add', ...}."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {prefix: str(tree)}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
