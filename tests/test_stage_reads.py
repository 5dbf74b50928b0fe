"""Every stage reads only what its dvc.yaml entry declares (files, folders, params.yaml), so a
change to anything it reads reruns it; and the two stale cases this once missed: a source model's
license and a compared model's score reach the published card."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import ALWAYS, hub_cache, new_project, repro, run
from stages.common.layout import model_dir
from stages.compose.graph import code_deps
from test_lora_inputs import make_adapter
from tiny import fresh_seed, write_causal_lm

pytestmark = pytest.mark.slow  # end-to-end: a DVC project built, and each kind of stage run again

AUDIT = Path(__file__).with_name("read_audit.py")
# Read on purpose and never a DVC dependency: the MLflow store (records, not build inputs), the
# digest cache (a memo of file sums) and git metadata (the commit a record names). A stage that
# finds a parent unrecorded (a fresh store) records it from params.yaml and its folder: records
# again, so the audit runs on the project's store, as a build does.
SIDE_STORES = ("mlflow.db", "mlruns", "mlartifacts", ".mergeforge", ".git")


@pytest.fixture(scope="module")
def built(tmp_path_factory, mlflow_template):
    root = tmp_path_factory.mktemp("stage-reads")
    seed = fresh_seed()
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root / "hf")}
    hub_cache(root / "hf", "org/h", write_causal_lm(root / "hub-src", seed + 2))
    project = root / "project"
    local = {n: {"source": "local", "path": f"models/{n}", "license": "mit"} for n in ("a", "b", "c")}
    text = "".join(" ".join(f"w{(i * 7 + j) % 21}" for j in range(6)) + "\n" for i in range(4))
    conf = {"eval/lm": {"kind": "perplexity", "tasks": {"text": "data/text.txt"}, "split": {"validation": 0.5}},
            "publish/pub": {"model": "mix", "repo_id": "me/mix", "gates": {}},
            "exports/l": {"model": "soup", "kind": "lora", "base": "a", "rank": 4},
            "searches/se": {"recipe": {"merge_method": "linear", "models": [
                {"model": "a", "parameters": {"weight": {"search": [0.1, 1.0]}}}, {"model": "b", "parameters": {"weight": 1.0}}]},
                "objective": {"suite": "lm"}, "budget": {"trials": 3}, "sampler": "random"}}
    linear = lambda *names: {"merge_method": "linear",  # noqa: E731
                             "models": [{"model": n, "parameters": {"weight": 1.0}} for n in names]}
    merges = {"soup": linear("a", "b"), "mix": linear("soup", "h"),
              "sw": linear("a", "h") | {"sweep": {"key": "models.0.parameters.weight", "values": [0.5, 1.0]}}}
    adapted = {"ad": {"source": "local", "path": "models/a", "adapter": {"source": "local", "path": "adapters/x"}}}
    new_project(project, local | adapted | {"h": {"source": "hub", "repo_id": "org/h", "license": "mit"}}, merges,
                env, conf=conf, files={"data/text.txt": text}, mlflow_db=mlflow_template)
    for i, name in enumerate(local):
        write_causal_lm(project / "models" / name, seed + i)
    make_adapter(project / "models" / "a", project / "adapters" / "x", seed, r=2, lora_alpha=4)
    config = project / "conf" / "config.yaml"
    config.write_text(config.read_text() + "evaluate:\n  baseline: c\n")
    repro(project, env, check=False)  # the new graph: compose rewrites dvc.yaml and stops
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "models"], project)
    repro(project, env)
    return project, env, seed


def _declared(project: Path, stage: dict) -> list[Path]:
    paths = [project / "params.yaml"] + [project / s for s in SIDE_STORES]
    for key in ("deps", "outs", "metrics", "plots"):
        for entry in stage.get(key, []):
            paths.append(project / (next(iter(entry)) if isinstance(entry, dict) else entry))
    return paths


def _undeclared_reads(project: Path, name: str, stage: dict, env: dict, tmp: Path) -> list[str]:
    """Run the stage's command with audit hooks, on a copy of the project's MLflow store (as a
    stage runs in a build) and no digest cache (so it digests all it reads)."""
    argv = stage["cmd"].split()
    assert argv[:2] == ["python", "-m"], stage["cmd"]
    log = tmp / f"{name}.log"
    shutil.rmtree(project / ".mergeforge", ignore_errors=True)
    proc = run([sys.executable, str(AUDIT), str(log), *argv[2:]], project,
               env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'store' / name}.db", "DVC_STAGE": name}
               | ({"MERGEFORGE_AUDIT_SHORT_DEMO": "1"} if name == "demo" else {}), check=False)
    assert proc.returncode == 0, (name, proc.stderr)
    declared = [str(p) for p in _declared(project, stage)]
    if name == "compose":  # always run: dvc.yaml is its output in all but name (DVC refuses it as an out), and
        declared += [str(project / p) for p in ("dvc.yaml", "stages")]  # it reads every stage's imports
    if name.startswith("fetch-"):  # its check of the models merged with it (headers) can fail it, never change it
        params = yaml.safe_load((project / "params.yaml").read_text())
        declared += [str(project / model_dir(m, params)) for m in params["models"]]
    outs = [str(project / (next(iter(e)) if isinstance(e, dict) else e)) for e in stage.get("outs", [])]
    missed = []
    for kind, path in (line.split(" ", 1) for line in log.read_text().splitlines()):
        if (not Path(path).is_relative_to(project) or path == str(project)  # the working directory (Hydra, MLflow)
                or not os.path.lexists(path)  # a probe of a path that is not there (git, import hooks) reads nothing
                or any(path == d or path.startswith(d + os.sep) for d in declared)
                or kind == "list" and any(path == os.path.dirname(o) for o in outs)  # its own leftovers by an out
                or kind == "list" and any(d.startswith(path + os.sep) for d in declared)):  # imports look in stages/
            continue
        missed.append(path)
    return sorted(set(missed))


def test_every_kind_of_stage_reads_only_what_its_dvc_yaml_entry_declares(built, tmp_path):
    project, env, _ = built
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    kinds = ["compose", "fetch-h", "fetch-ad", "export-l", "merge-soup", "merge-mix", "eval-mix", "eval-h", "report-mix", "sweep-sw",
             "publish-pub", "search-se", "merge-se", "eval-se", "report-se", "lineage"]
    assert set(kinds) <= set(stages), sorted(stages)
    (tmp_path / "store").mkdir()
    for name in kinds:
        if name != "lineage":  # it starts a store of its own: it records everything, so reads all it may
            shutil.copyfile(project / "mlflow.db", tmp_path / "store" / f"{name}.db")
        missed = _undeclared_reads(project, name, stages[name], env, tmp_path)
        assert missed == [], (name, missed)
    demo = {"cmd": f"python -m stages.demo {project / 'artifacts' / 'demo'}", "deps": code_deps("demo"),
            "outs": ["artifacts/demo"]}  # not in this project's graph: run as the demo's entry has it
    shutil.copyfile(project / "mlflow.db", tmp_path / "store" / "demo.db")
    assert _undeclared_reads(project, "demo", demo, env, tmp_path) == []


def test_the_audit_sees_an_undeclared_read(built, tmp_path):
    """The check above can fail: the report of mix, its deps cut to its own metrics, is caught
    reading its parents' and its base's."""
    project, env, _ = built
    stage = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["report-mix"]
    kept = [d for d in stage["deps"] if not d.startswith("artifacts/eval/") or d.endswith("/mix.json")]
    stage = stage | {"deps": kept}
    (tmp_path / "store").mkdir()
    shutil.copyfile(project / "mlflow.db", tmp_path / "store" / "report-mix.db")
    missed = _undeclared_reads(project, "report-mix", stage, env, tmp_path)
    assert missed == sorted(str(project / f"artifacts/eval/{m}.json") for m in ("c", "h", "soup"))


def _export_runs(client, experiments: list[str]) -> list:
    """export-l's runs, whole (search_runs leaves a run's model inputs out)."""
    found = client.search_runs(experiments, "tags.`mergeforge.dvc_stage` = 'export-l'")
    return [client.get_run(r.info.run_id) for r in found]


def test_an_export_is_recorded_with_the_models_it_was_made_from(built):
    """export-l's run: its folder's digest, its settings, and as inputs the merge and the base the
    adapter was extracted from (their LoggedModels as the build recorded them)."""
    import mlflow

    from stages.common.digest import directory_digest

    project, _, _ = built
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = _export_runs(client, experiments)
    assert run.data.tags["mergeforge.digest"] == directory_digest(project / "artifacts/exports/l")
    assert run.data.params["kind"] == "lora" and run.data.params["rank"] == "4" and run.data.params["base"] == "a"

    def model_id(name):
        (model,) = client.search_logged_models(experiments, filter_string=f"tags.`mergeforge.name` = '{name}'")
        return model.model_id
    assert sorted(m.model_id for m in run.inputs.model_inputs) == sorted([model_id("soup"), model_id("a")])


def _card(project: Path) -> str:
    return (project / "artifacts/publish/pub/repo/README.md").read_text()


def test_a_license_change_reruns_publish_alone_and_reaches_the_card(built):
    project, env, _ = built
    assert "license: mit" in _card(project)
    for name in ("a", "b", "c", "h"):
        path = project / "conf" / "models" / f"{name}.yaml"
        path.write_text(path.read_text().replace("license: mit", "license: apache-2.0"))
    ran, _ = repro(project, env)
    assert ran == ALWAYS | {"publish-pub"}
    assert "license: apache-2.0" in _card(project)


def test_a_new_score_of_the_base_reruns_publish_and_reaches_the_card(built):
    """c is only the baseline of mix (not merged into it): new weights change c's perplexity and no
    merge; the card, which shows c's score, follows."""
    project, env, seed = built
    metrics = project / "artifacts/eval/c.json"
    score = lambda: json.loads(metrics.read_text())["lm"]["perplexity"]["text"]  # noqa: E731
    before = score()
    assert f"| {before:.4g} |" in _card(project).split("## Evaluation")[1]
    shutil.rmtree(project / "models" / "c")
    write_causal_lm(project / "models" / "c", seed + 100)
    ran, _ = repro(project, env)
    assert ran == ALWAYS | {"eval-c", "report-soup", "report-mix", "report-sw-1", "report-sw-2", "report-se",
                   "publish-pub"}  # se (a search's merge) has no base_model either: c is its baseline too
    assert score() != before and f"| {score():.4g} |" in _card(project).split("## Evaluation")[1]


def test_a_teammate_clone_pull_and_repro_gives_the_whole_lineage(built, tmp_path):
    """A teammate with a fresh store: `git clone`, `dvc pull`, `dvc repro` rebuilds nothing (but the
    staging folder of the publish target), leaves git clean, and their store then holds every
    model, merge, metric set and alias of the build; `--sync` by hand into another store leaves
    out the builds an unbuilt edit makes stale."""
    import mlflow

    project, env, _ = built
    run(["dvc", "remote", "add", "-f", "-d", "team", str(tmp_path / "remote")], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "built, with a remote"], project)
    run(["dvc", "push", "-q"], project, env)
    mate = tmp_path / "mate"
    run(["git", "clone", "-q", str(project), str(mate)], tmp_path)
    run(["dvc", "pull", "-q"], mate, env)
    ran, proc = repro(mate, env)
    assert ran == ALWAYS | {"publish-pub"}, proc.stdout  # its repo/ folder is git-ignored and not cached: restaged
    assert run(["git", "status", "--porcelain"], mate).stdout == ""
    lines = run([sys.executable, "-m", "stages.lineage", "mix"], mate, env).stdout.splitlines()
    names = [line.lstrip("├└─│ ").split("  ")[0] for line in lines]
    assert names == ["mix", "h", "soup", "a", "b"], lines  # parents by name
    client = mlflow.MlflowClient(f"sqlite:///{mate / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    params = yaml.safe_load((mate / "params.yaml").read_text())
    for name in list(params["models"]) + list(params["merges"]):
        (model,) = client.search_logged_models(experiments, filter_string=f"tags.`mergeforge.name` = '{name}'")
        scores = json.loads((mate / "artifacts/eval" / f"{name}.json").read_text())["lm"]["perplexity"]
        logged = {m.key: m.value for m in model.metrics or [] if not m.key.endswith(".validation")}
        assert logged == {f"lm.{task}.perplexity": v for task, v in scores.items()}, name
        assert model.tags["mergeforge.eval.test"].split()[0] in {r.info.run_id for r in client.search_runs(experiments)}
    assert client.get_model_version_by_alias("mix", "candidate").source.startswith("models:/m-")
    (export,) = _export_runs(client, experiments)  # recorded by the lineage stage: export-l did not run
    assert sorted(m.model_id for m in export.inputs.model_inputs) == sorted(
        client.search_logged_models(experiments, filter_string=f"tags.`mergeforge.name` = '{n}'")[0].model_id
        for n in ("soup", "a"))
    ran, _ = repro(mate, env)  # a second time: the same records, none added
    assert ran == ALWAYS and len(client.search_logged_models(experiments)) == len(params["models"]) + len(params["merges"])
    assert len(_export_runs(client, experiments)) == 1
    recipe = mate / "conf/merges/soup.yaml"  # an edit not built yet: by hand, sync leaves out what it would change
    recipe.write_text(recipe.read_text().replace("weight: 1.0", "weight: 0.7", 1))
    run([sys.executable, "-m", "stages.compose"], mate, env)
    store = f"sqlite:///{tmp_path / 'server.db'}"
    out = run([sys.executable, "-m", "stages.lineage", "--sync"], mate, env | {"MLFLOW_TRACKING_URI": store}).stdout
    assert "not recorded: soup: soup is out of date" in out and "not recorded: mix: soup is out of date" in out
    server = mlflow.MlflowClient(store)
    names = {m.tags["mergeforge.name"] for m in server.search_logged_models(
        [e.experiment_id for e in server.search_experiments()])}
    assert "a" in names and "sw-1" in names and not {"soup", "mix"} & names


def test_an_experiment_leaves_the_registry_as_it_was(built):
    """`dvc exp run` builds, evaluates and stages like `dvc repro`, but registers nothing and moves
    no alias; the models it makes are tagged with the experiment's name."""
    import mlflow

    project, env, _ = built
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "built", "--allow-empty"], project)
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    versions = lambda: sorted((v.version, v.source) for v in client.search_model_versions("name = 'mix'"))  # noqa: E731
    before, alias = versions(), client.get_model_version_by_alias("mix", "candidate").version
    proc = run(["dvc", "exp", "run", "-n", "lighter", "-S", "conf/merges/soup.yaml:models.0.parameters.weight=0.5"],
               project, env)
    assert "Running stage 'publish-pub'" in proc.stdout and "experiment lighter: not registered" in proc.stderr
    assert versions() == before and client.get_model_version_by_alias("mix", "candidate").version == alias
    receipt = json.loads((project / "artifacts/publish/pub/receipt.json").read_text())
    assert receipt["experiment"] == "lighter" and "registry" not in receipt
    experiments = [e.experiment_id for e in client.search_experiments()]
    newest = client.search_logged_models(experiments, filter_string="tags.`mergeforge.name` = 'mix'",
                                         order_by=[{"field_name": "creation_timestamp", "ascending": False}])[0]
    assert newest.tags["mergeforge.experiment"] == "lighter"
