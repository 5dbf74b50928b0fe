"""MLflow records as a function of the build: one LoggedModel per artifact, identified by its
name and content digest (a rebuild of the same bytes is the same model), carrying its parents,
recipe and source on its own page; and one evaluation run per (model, split, suites), keyed by the
suites' settings and data digests, so a suite change gives a new, distinguishable set of metrics
and a revert finds the old one again.

The tracking store is MLFLOW_TRACKING_URI when set (a team server), else mlflow.db in the project
(see store.py). Records are idempotent: what is already recorded is found, not recorded again, and
whatever is missing (a fresh store, a build restored from DVC's cache, a teammate's clone) is
recorded from params.yaml and the files on the way. Weights are never logged: DVC stores them.
An export (a GGUF, an extracted adapter) gets a run of its own, keyed by its folder's digest, whose
inputs are the models it was made from.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import warnings
from contextlib import contextmanager
from pathlib import Path

from .digest import directory_digest, file_sums
from .errors import LineageError
from .layout import export_dir, model_dir, parents
from .recipes import recipe_of, search_origin
from .store import EXPERIMENT, artifact_root, check_store, shown_uri

TAG = "mergeforge."
RECORD = "2"  # the form of a record: one of an older form is left as it is, and this one made beside it
NOTE = "mlflow.note.content"  # the description MLflow's UI shows (markdown) on a model's and a run's page
CURRENT = "Current scores:"


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"


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
                         mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_root(uri, root)))
        mlflow.set_experiment(experiment_id=experiment_id)
        return experiment_id


def find(name: str, digest: str | None = None):
    """The newest LoggedModel of that name (and digest) in this record form, or None."""
    import mlflow

    query = (f"tags.`{TAG}name` = '{name}' AND tags.`{TAG}record` = '{RECORD}'"
             + (f" AND tags.`{TAG}digest` = '{digest}'" if digest else ""))
    with mlflow_errors(f"cannot search for model '{name}'"):
        found = mlflow.search_logged_models(filter_string=query, order_by=[{"field_name": "creation_timestamp",
                                                                             "ascending": False}],
                                            max_results=1, output_format="list")
    return found[0] if found else None


def ensure(name: str, params: dict) -> str:
    """The model id of this artifact as it is on disk now, recording it (and its parents) if new."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    path = model_dir(name, params)
    digest = directory_digest(path)
    existing = find(name, digest)
    if existing is not None:
        return existing.model_id
    # the page's name says which build it is; tags.mergeforge.name is the name lookups use
    shown = f"{name}-{digest.partition(':')[2][:8]}"
    tags = {f"{TAG}name": name, f"{TAG}digest": digest, f"{TAG}path": shown_path(path),
            f"{TAG}record": RECORD} | _experiment_tag()
    if name not in params["merges"]:
        return _record_source(name, params, shown, tags)
    names = parents(name, params)
    parent_models = [_recorded(p, params) for p in names]
    spec = params["merges"][name] | {"recipe": recipe_of(name, params)}
    method = spec["recipe"]["merge_method"]
    tags.update({f"{TAG}method": method, f"{TAG}dvc_stage": f"merge-{name}", f"{TAG}git_commit": git_commit(),
                 f"{TAG}inputs": ",".join(names)})
    run_tags = dict(tags)
    model_params = flatten({k: spec[k] for k in ("recipe", "seed", "device") if k in spec})
    run_params = dict(model_params)
    model_params["method"] = method
    for parent, model in zip(names, parent_models):  # the chain on the model's own page
        parent_digest = model.tags[f"{TAG}digest"]
        tags[f"{TAG}parent.{parent}"] = f"{parent_digest} {model.model_id}"
        model_params |= {f"parent.{parent}.digest": parent_digest, f"parent.{parent}.model_id": model.model_id}
    origin = search_origin(name, params)
    if origin:  # which search, study and trial found its recipe (the search's run holds every trial)
        tags.update({f"{TAG}{k}": str(origin[k]) for k in ("search", "study", "trial")})
        model_params |= {"search": origin["search"], "trial": str(origin["trial"])}
        run_ids = search_run_ids(origin["study"])
        if run_ids:
            tags[f"{TAG}search_run"] = run_ids[0]
    with mlflow_errors(f"cannot record merge '{name}'"), mlflow.start_run(run_name=f"merge-{name}",
                                                                          tags=run_tags) as run:
        mlflow.log_params(run_params)
        about = _about_merge(name, method, tags, parent_models, run.info.experiment_id)
        model = mlflow.initialize_logged_model(name=shown, source_run_id=run.info.run_id, tags=tags | {NOTE: about},
                                               params=model_params)
        mlflow.finalize_logged_model(model.model_id, "READY")
        # the run's output, not its inputs: MLflow lists an input's registered versions on the run's page
        mlflow.MlflowClient().log_outputs(run.info.run_id, [LoggedModelOutput(model.model_id, 0)])
        return model.model_id


def record_export(name: str, params: dict) -> str:
    """The run of export NAME as its folder is now: found when recorded, else one new run with the
    export's settings as params and the models it was made from (the merge; a LoRA's base too) as
    its inputs, so the merge's page leads to the files a runtime loads. Returns the run id."""
    import mlflow
    from mlflow.entities import LoggedModelInput

    spec = params["exports"][name]
    sources = export_inputs(spec)
    model_ids = [ensure(m, params) for m in sources]
    folder = export_dir(name, params)
    tags = {f"{TAG}name": name, f"{TAG}digest": directory_digest(folder), f"{TAG}record": RECORD,
            f"{TAG}dvc_stage": f"export-{name}", f"{TAG}kind": spec["kind"], f"{TAG}inputs": ",".join(sources),
            f"{TAG}path": shown_path(folder)} | _experiment_tag()
    with mlflow_errors(f"cannot record export '{name}'"):
        found = _recorded_run(tags, ("name", "digest", "dvc_stage", "record"))
        if found:
            return found
        with mlflow.start_run(run_name=f"export-{name}", tags=tags) as run:
            mlflow.log_params(flatten(spec))
            for model_id in model_ids:  # one call per model: the plural log_inputs is Databricks-only
                mlflow.log_input(model=LoggedModelInput(model_id))
            return run.info.run_id


def _recorded_run(tags: dict, keys: tuple[str, ...], experiment_ids: list[str] | None = None) -> str | None:
    """The oldest finished run (in the current experiment, or these) whose tags `keys` equal
    `tags`': what a stage records is found again, not recorded twice."""
    import mlflow

    query = " AND ".join(f"tags.`{TAG}{k}` = '{tags[TAG + k]}'" for k in keys) + " AND attributes.status = 'FINISHED'"
    found = mlflow.search_runs(experiment_ids=experiment_ids, filter_string=query, output_format="list",
                               order_by=["start_time ASC"], max_results=1)
    return found[0].info.run_id if found else None


def _experiment_tag() -> dict[str, str]:
    """Tag `mergeforge.experiment` inside `dvc exp run` (its name), else none."""
    return {f"{TAG}experiment": experiment()} if experiment() else {}


def export_inputs(spec: dict) -> list[str]:
    """The models an export is made from: its merge, and a LoRA's base."""
    return [spec["model"]] + ([spec["base"]] if spec["kind"] == "lora" else [])


def _record_source(name: str, params: dict, shown: str, tags: dict) -> str:
    """A source model: an external LoggedModel whose params and description give where it comes
    from (hub repo and pinned commit, or its path) and its digest."""
    import mlflow

    spec = params["models"][name]
    source = {k: str(v) for k, v in spec.items() if k not in ("path", "adapter")}
    path, digest = tags[f"{TAG}path"], tags[f"{TAG}digest"]
    about = (f"Hub model `{source.get('repo_id')}` at commit `{source.get('sha')}`" if source["source"] == "hub"
             else f"Local model at `{spec['path'] if spec.get('adapter') else path}`")
    if spec.get("adapter"):  # where the adapter comes from; `path` is the merged folder
        adapter = spec["adapter"]
        source |= {f"adapter.{k}": str(v) for k, v in adapter.items()} | ({"base_path": spec["path"]}
                                                                          if "path" in spec else {})
        about += " with the LoRA adapter " + (f"`{adapter['repo_id']}` at commit `{adapter['sha']}`"
                                              if adapter["source"] == "hub" else f"at `{adapter['path']}`")
        about += f" merged in (at `{path}`)"
    about += f", digest `{digest}`."
    with mlflow_errors(f"cannot record model '{name}'"):
        return mlflow.create_external_model(name=shown, tags=tags | {f"{TAG}{k}": v for k, v in source.items()}
                                            | {NOTE: about}, params=source | {"path": path, "digest": digest}).model_id


def _recorded(name: str, params: dict):
    """The LoggedModel of a parent, recorded first if the store lacks it."""
    import mlflow

    with mlflow_errors(f"cannot read the record of '{name}'"):
        return mlflow.get_logged_model(ensure(name, params))


def _about_merge(name: str, method: str, tags: dict, parent_models: list, experiment_id: str) -> str:
    """The model page's description (markdown): how it was made, each parent a link to its page."""
    link = lambda m: f"[{m.name}](#/experiments/{experiment_id}/models/{m.model_id})"  # noqa: E731
    lines = [f"A `{method}` merge built by stage `merge-{name}` at git commit `{tags[f'{TAG}git_commit'][:12]}`, "
             f"digest `{tags[f'{TAG}digest']}`. Parents:", ""]
    lines += [f"- {link(m)}: digest `{m.tags[f'{TAG}digest']}`" for m in parent_models]
    if f"{TAG}search" in tags:
        found = f"search `{tags[f'{TAG}search']}`, trial {tags[f'{TAG}trial']}"
        run = tags.get(f"{TAG}search_run")
        lines += ["", f"Its recipe was found by {found}"
                  + (f" ([the search's run](#/experiments/{experiment_id}/runs/{run}))." if run else ".")]
    return "\n".join(lines)


def shown_path(path: Path) -> str:
    """A path as recorded: relative to the project when inside it, so every clone records the same."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(path).resolve())


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


def task_data(suites: dict, suite: str, task: str, split: str) -> Path:
    files = suites[suite]["tasks"][task]
    return Path(files.get(split) or files["file"])


def evaluation_key(suites: dict, metrics: dict, split: str) -> tuple[str, dict[str, str]]:
    """What produced a split's scores: a digest over each scored suite's settings and the sha256 of
    each task's data, and those settings as run params ({'skills.tasks.add.sha256': ..., ...})."""
    data = {(suite, task): task_data(suites, suite, task, split)
            for suite in sorted(metrics) for task in sorted(suites[suite]["tasks"])}
    sums = file_sums(list(data.values()))  # cached: every model's evaluation reads the same files
    settings: dict[str, str] = {}
    for suite in sorted(metrics):
        conf = {k: v for k, v in suites[suite].items() if k != "tasks"}
        settings.update(flatten(conf, suite))
        for task in sorted(suites[suite]["tasks"]):
            settings[f"{suite}.tasks.{task}.data"] = shown_path(data[suite, task])
            settings[f"{suite}.tasks.{task}.sha256"] = sums[data[suite, task]]
    unplaced = {k: v for k, v in settings.items() if not k.endswith(".data")}  # paths differ between clones
    return hashlib.sha256(json.dumps(unplaced, sort_keys=True).encode()).hexdigest()[:16], settings


def log_metrics(name: str, model_id: str, metrics: dict, suites: dict, split: str = "test") -> str:
    """The evaluation run of this model, split and suites: found when already recorded, else one
    run whose params are the suites' settings and data digests, each score linked to the model and
    to its dataset (named suite/task, digest = the evaluation key). The model is tagged with the run
    (mergeforge.eval.SPLIT), so its page says which set of metrics is current. Returns the run id."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    suffix = "" if split == "test" else f".{split}"
    key, settings = evaluation_key(suites, metrics, split)
    model = mlflow.get_logged_model(model_id)
    digest = model.tags[f"{TAG}digest"]
    tags = {f"{TAG}name": name, f"{TAG}digest": digest, f"{TAG}split": split, f"{TAG}evaluation": key,
            f"{TAG}dvc_stage": f"eval-{name}"} | _experiment_tag()
    with mlflow_errors(f"cannot log the metrics of '{name}'"):
        run_id = _recorded_run(tags, ("name", "digest", "split", "evaluation"), [model.experiment_id])
        if run_id is None:
            with mlflow.start_run(run_name=f"eval-{name}{suffix}", tags=tags) as run:
                mlflow.log_params(settings)
                for suite, by_kind in sorted(metrics.items()):
                    for kind, scores in by_kind.items():
                        for task, value in sorted(scores.items()):
                            data = task_data(suites, suite, task, split)
                            dataset = MetaDataset(resolve_dataset_source(shown_path(data)),
                                                  name=f"{suite}/{task}{suffix}", digest=key)
                            mlflow.log_metric(f"{suite}.{task}.{kind}{suffix}", value, model_id=model_id,
                                              dataset=dataset)
                run_id = run.info.run_id
        current = model.tags | {f"{TAG}eval.{split}": f"{run_id} (evaluation {key})"}
        mlflow.set_logged_model_tags(model_id, {f"{TAG}eval.{split}": current[f"{TAG}eval.{split}"],
                                                NOTE: _with_current_scores(current, model.experiment_id)})
    return run_id


def _with_current_scores(tags: dict, experiment_id: str) -> str:
    """The model's description with its last paragraph naming the evaluation runs whose scores are
    current (of the suites as params.yaml has them now), one link per split."""
    about = tags.get(NOTE, "").split(CURRENT)[0].rstrip()
    runs = sorted((k.removeprefix(f"{TAG}eval."), v.split()[0], v.split()[-1].rstrip(")"))
                  for k, v in tags.items() if k.startswith(f"{TAG}eval."))
    shown = ", ".join(f"[{split}](#/experiments/{experiment_id}/runs/{run}) (dataset digest `{key}`)"
                      for split, run, key in runs)
    return f"{about}\n\n{CURRENT} {shown}."


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
