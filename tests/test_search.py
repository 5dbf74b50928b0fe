"""Searches (conf/searches, stages/search): trials deterministic for one worker and seed, tuned on
validation data only, resumed after a kill without redoing a finished trial, shared by workers; the
best recipe builds like any merge of the same YAML; a bad search file is named with its key."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from mergekit_ops import MergeOptions, merge, parse_recipe
from pipeline import new_project, run
from stages.common.errors import ConfigError
from stages.compose.stage import plan
from tiny import file_digests, finetune, fresh_seed, write_causal_lm

AUDIT = Path(__file__).with_name("read_audit.py")
SEARCH = {"recipe": {"merge_method": "task_arithmetic", "base_model": "base",
                     "models": [{"model": m, "parameters": {"weight": {"search": [0.0, 1.5]}}} for m in ("x", "y")],
                     "dtype": "float32"},
          "objective": {"suite": "qa", "aggregate": "mean"}, "budget": {"trials": 8}, "sampler": "tpe", "seed": 3}


def _family(root: Path, seed: int) -> dict[str, Path]:
    """A tiny causal LM and two fine-tunes of it (the same config and tokenizer)."""
    base = write_causal_lm(root / "base", seed)
    out = {"base": base}
    for i, name in enumerate(("x", "y")):
        shutil.copytree(base, root / name)
        weights = root / name / "model.safetensors"
        save_file(finetune(load_file(weights), seed + i + 1, scale=0.5), weights, metadata={"format": "pt"})
        out[name] = root / name
    return out


def _qa(rng: random.Random, n: int, teacher: Path) -> str:
    """n prompts answered as the model `teacher` answers them (its greedy next word): a merge scores
    by how much of that model it carries, so trials differ."""
    from stages.evaluate.suites import load

    model, tok = load(teacher)
    rows = []
    for _ in range(n):
        prompt = " ".join(f"w{rng.randrange(21)}" for _ in range(3))
        out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=1, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        rows.append(json.dumps({"prompt": prompt, "answer": tok.decode(out[0, -1:], skip_special_tokens=True)}))
    return "\n".join(rows) + "\n"


@pytest.fixture
def project(tmp_path, mlflow_template):
    seed = fresh_seed()
    rng = random.Random(seed)
    models = _family(tmp_path / "src", seed)
    conf = {"eval/qa": {"kind": "exact_match", "max_new_tokens": 1,
                        "tasks": {t: {"validation": f"data/{t}.validation.jsonl", "test": f"data/{t}.test.jsonl"}
                                  for t in ("one", "two")}},
            "searches/s": SEARCH}
    files = {f"data/{t}.{split}.jsonl": _qa(rng, 12, models[teacher]) for t, teacher in (("one", "x"), ("two", "y"))
             for split in ("validation", "test")}
    return new_project(tmp_path / "project", {n: str(p) for n, p in models.items()}, {}, conf=conf, files=files,
                       mlflow_db=mlflow_template)


def _search(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "stages.search", "s", *args], project, check=check)


def _results(project: Path) -> tuple[str, dict, list[dict]]:
    folder = project / "artifacts" / "searches" / "s"
    rows = json.loads((folder / "trials.json").read_text())["trials"]
    return ((folder / "recipe.yaml").read_text(), json.loads((folder / "best.json").read_text()),
            rows)


@pytest.mark.slow
def test_one_worker_and_seed_give_the_same_trials_and_only_validation_files_are_read(project, tmp_path):
    log = tmp_path / "reads.log"
    run([sys.executable, str(AUDIT), str(log), "stages.search", "s"], project)
    first = _results(project)
    assert len(first[2]) == 8 and first[1]["trials"] == 8
    picture = (project / "artifacts/searches/s/trials.png").read_bytes()
    opened = {Path(line.split(" ", 1)[1]).name for line in log.read_text().splitlines() if line.startswith("open")}
    assert {"one.validation.jsonl", "two.validation.jsonl"} <= opened
    assert not {"one.test.jsonl", "two.test.jsonl"} & opened
    shutil.rmtree(project / ".mergeforge" / "searches")  # a new study, from nothing
    _search(project)
    assert _results(project) == first
    assert (project / "artifacts/searches/s/trials.png").read_bytes() == picture  # the same trials, the same picture
    best = first[1]
    assert best["objective"] == max(r["objective"] for r in first[2])
    assert yaml.safe_load(first[0])["models"][0]["parameters"]["weight"] == best["values"]["x.weight"]


@pytest.mark.slow
def test_the_best_recipe_builds_byte_identically_to_a_merge_of_the_same_yaml(project, tmp_path):
    _search(project)
    run([sys.executable, "-m", "stages.merge", "s"], project)
    recipe = parse_recipe(yaml.safe_load((project / "artifacts/searches/s/recipe.yaml").read_text()), "recipe")
    params = yaml.safe_load((project / "params.yaml").read_text())
    recipe.rename_models(params["merges"]["s"]["inputs"])
    plain = merge(recipe, tmp_path / "plain", MergeOptions(seed=params["merges"]["s"]["seed"]))
    assert file_digests(plain) == file_digests(project / "artifacts/merges/s")


@pytest.mark.slow
def test_the_search_and_its_trials_are_mlflow_runs_and_the_merge_names_its_trial(project, monkeypatch):
    import mlflow

    _search(project)
    run([sys.executable, "-m", "stages.merge", "s"], project)
    _, best, rows = _results(project)
    lineage = run([sys.executable, "-m", "stages.lineage", "s"], project).stdout
    assert lineage.startswith(f"s  merge (task_arithmetic, found by search s, trial {best['trial']})")
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")  # not set_tracking_uri: it exports it
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    parents = [r for r in runs if r.data.tags.get("mergeforge.dvc_stage") == "search-s"]
    assert len(parents) == 1 and parents[0].data.tags["mergeforge.best_trial"] == str(best["trial"])
    trials = {int(r.data.tags["mergeforge.trial"]): r for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(trials) == [r["trial"] for r in rows]
    for row in rows:
        got = trials[row["trial"]].data
        assert got.metrics["objective"] == row["objective"] and got.metrics["seconds"] > 0
        assert float(got.params["x.weight"]) == row["x.weight"] and got.metrics["validation.one"] == row["one"]
    assert [n for n, r in trials.items() if r.data.tags.get("mergeforge.best") == "true"] == [best["trial"]]
    from stages.publish.card import _found

    monkeypatch.chdir(project)  # params.yaml paths are the project's
    card = _found("s", yaml.safe_load((project / "params.yaml").read_text()))
    assert f"search `s`: trial {best['trial']}, the best of 8" in card
    model = client.search_logged_models(experiments, filter_string="tags.`mergeforge.name` = 's'")[0]
    assert model.tags["mergeforge.search"] == "s" and model.tags["mergeforge.trial"] == str(best["trial"])
    assert model.tags["mergeforge.search_run"] == parents[0].info.run_id


@pytest.mark.slow
def test_a_method_choice_and_a_layer_gradient_search_end_to_end(project, tmp_path):
    recipe = {"merge_method": {"choice": ["ties", "dare_ties"]}, "base_model": "base", "dtype": "float32",
              "models": [{"model": m, "parameters": {"weight": {"search": [0.0, 1.5], "groups": 2}, "density": 0.5}}
                         for m in ("x", "y")]}
    (project / "conf/searches/s.yaml").write_text(yaml.safe_dump(dict(SEARCH, recipe=recipe, budget={"trials": 6}),
                                                                 sort_keys=False))
    run([sys.executable, "-m", "stages.compose"], project, check=False)
    _search(project)
    text, best, rows = _results(project)
    assert {r["merge_method"] for r in rows} <= {"ties", "dare_ties"} and len(rows) == 6
    assert set(rows[0]) >= {"x.weight.0", "x.weight.1", "y.weight.0", "y.weight.1"}
    found = yaml.safe_load(text)
    assert found["merge_method"] == best["values"]["merge_method"]
    assert found["models"][0]["parameters"]["weight"] == [best["values"]["x.weight.0"], best["values"]["x.weight.1"]]
    run([sys.executable, "-m", "stages.merge", "s"], project)
    plain = parse_recipe(found, "recipe")
    params = yaml.safe_load((project / "params.yaml").read_text())
    plain.rename_models(params["merges"]["s"]["inputs"])
    out = merge(plain, tmp_path / "plain", MergeOptions(seed=params["merges"]["s"]["seed"]))
    assert file_digests(out) == file_digests(project / "artifacts/merges/s")


def _finished(project: Path) -> dict[int, tuple]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = project / ".mergeforge" / "searches" / "s.journal"
    if not journal.is_file():
        return {}
    storage = JournalStorage(JournalFileBackend(str(journal)))
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if not names:
        return {}
    study = optuna.load_study(study_name=names[0], storage=storage)
    return {t.number: (t.state.name, tuple(sorted(t.params.items())), t.value) for t in study.get_trials()}


@pytest.mark.slow
def test_a_killed_search_resumes_and_redoes_no_finished_trial(project):
    whole = project.parent / "whole"
    shutil.copytree(project, whole)
    _search(whole)
    expected = _results(whole)
    proc = subprocess.Popen([sys.executable, "-m", "stages.search", "s"], cwd=project, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while sum(s == "COMPLETE" for s, _, _ in _finished(project).values()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the search ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {n: t for n, t in _finished(project).items() if t[0] == "COMPLETE"}
    _search(project)
    after = _finished(project)
    assert all(after[n] == t for n, t in before.items())  # kept, not redone
    done = [t for t in after.values() if t[0] == "COMPLETE"]
    assert len(done) == 8 and len({p for _, p, _ in done}) == 8
    # the same trials as a run never killed; a trial killed while running was failed and its turn
    # asked again under the next number, so trial numbers may differ
    unnumbered = lambda r: (r[0].split("\n", 1)[1], {k: v for k, v in r[1].items() if k != "trial"},  # noqa: E731
                            [{k: v for k, v in row.items() if k != "trial"} for row in r[2]])
    assert unnumbered(_results(project)) == unnumbered(expected)


@pytest.mark.slow
def test_two_workers_share_one_study_and_the_stage_gathers_its_best(project):
    SEARCH_BIG = dict(SEARCH, budget={"trials": 12})
    (project / "conf/searches/s.yaml").write_text(yaml.safe_dump(SEARCH_BIG, sort_keys=False))
    run([sys.executable, "-m", "stages.compose"], project, check=False)
    workers = [subprocess.Popen([sys.executable, "-m", "stages.search", "s", "--worker"], cwd=project,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    trials = _finished(project)
    done = {n: t for n, t in trials.items() if t[0] == "COMPLETE"}
    assert len(done) == 12 and len(trials) == len(set(trials))
    assert all("trial" in log for log in logs)  # both took trials
    proc = _search(project)
    assert "trial" not in proc.stderr.replace("the best recipe", "")  # it only gathered
    _, best, rows = _results(project)
    top = max(done.items(), key=lambda kv: (kv[1][2], -kv[0]))
    assert best["trial"] == top[0] and len(rows) == 12


@pytest.mark.slow
def test_workers_submitted_through_submitit_spend_the_budget(project):
    """The multi-machine path (a SLURM array job) submits through submitit; its local executor
    runs the same submission here."""
    proc = _search(project, "--submit", "2")
    assert "2 workers submitted (local)" in proc.stderr
    ran = [int(n) for n in proc.stderr.split("trials (")[1].split(")")[0].split(", ")]
    assert sum(ran) == 8 and len(ran) == 2
    assert sum(t[0] == "COMPLETE" for t in _finished(project).values()) == 8
    _search(project)
    assert len(_results(project)[2]) == 8


@pytest.mark.slow
def test_trials_through_files_score_as_trials_in_memory(project):
    """A search too big for memory merges each trial into a temporary folder: the same trials."""
    _search(project)
    in_memory = _results(project)
    (project / "conf/searches/s.yaml").write_text(yaml.safe_dump(dict(SEARCH, in_memory=False), sort_keys=False))
    run([sys.executable, "-m", "stages.compose"], project, check=False)
    proc = _search(project)
    assert "through files" in proc.stderr and "in memory" not in proc.stderr
    files = _results(project)
    assert files[2] == in_memory[2]  # every trial's values and scores
    assert {k: v for k, v in files[1].items() if k != "study"} == {k: v for k, v in in_memory[1].items() if k != "study"}
    assert not list((project / ".mergeforge/searches/s").glob("trial-*"))  # each removed after its evaluation


@pytest.mark.slow
def test_a_pruned_search_stops_trials_early_and_stays_deterministic(project):
    pruned = dict(SEARCH, budget={"trials": 12}, pruner={"fraction": 0.5, "percentile": 50.0, "startup": 2})
    (project / "conf/searches/s.yaml").write_text(yaml.safe_dump(pruned, sort_keys=False))
    run([sys.executable, "-m", "stages.compose"], project, check=False)
    _search(project)
    first = _results(project)
    states = [r["state"] for r in first[2]]
    assert len(states) == 12 and "pruned" in states and states[:2] == ["complete", "complete"]
    shutil.rmtree(project / ".mergeforge" / "searches")
    _search(project)
    assert _results(project) == first


def _conf_project(tmp_path: Path, search: dict, suite: dict | None = None) -> Path:
    root = tmp_path / "p"
    for group, name, body in [("models", "base", {"source": "local", "path": "m/base"}),
                              ("models", "x", {"source": "local", "path": "m/x"}),
                              ("models", "y", {"source": "local", "path": "m/y"}),
                              ("eval", "qa", suite or {"kind": "exact_match",
                                                       "tasks": {"one": {"validation": "v.jsonl", "test": "t.jsonl"}}}),
                              ("searches", "s", search)]:
        (root / "conf" / group).mkdir(parents=True, exist_ok=True)
        (root / "conf" / group / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    (root / "conf/config.yaml").write_text("defaults:\n  - mergeforge_schema\n  - _self_\ndemo:\n  enabled: false\n")
    return root


def _with(path: str, value) -> dict:
    body = json.loads(json.dumps(SEARCH))
    node, steps = body, path.split(".")
    for step in steps[:-1]:
        node = node[int(step)] if isinstance(node, list) else node[step]
    node[steps[-1]] = value
    return body


@pytest.mark.parametrize("search, key", [
    (_with("recipe.models.0.parameters.weight", {"search": [1.0, 0.5]}), "recipe.models[0].parameters.weight.search"),
    (_with("recipe.models.0.parameters.weight", {"search": [0, 1], "spread": 2}), "recipe.models[0].parameters.weight"),
    (_with("recipe.models.0.parameters.weight", {"search": [0, 1], "log": True}), "recipe.models[0].parameters.weight.log"),
    (_with("recipe.models.0.parameters.weight", {"search": [0, 1], "groups": 1}), "recipe.models[0].parameters.weight.groups"),
    (_with("recipe.merge_method", {"choice": ["ties", "dare_ties"]}) | {"sampler": "cmaes"}, "sampler"),
    (_with("sampler", "annealing"), "sampler"),
    (_with("sampler", "grid"), "sampler"),
    (_with("budget", {}), "budget"),
    (_with("objective.suite", "nope"), "objective.suite"),
    (_with("objective.aggregate", "median"), "objective.aggregate"),
    (_with("objective.weights", {"three": 1.0}), "objective.weights.three"),
    (_with("constraints", [{"sum": ["x.weight", "z.weight"]}]), "constraints[0]"),
    (_with("recipe.models.1.model", "z"), None),
    (_with("recipe.models.1.model", {"choice": ["x", "y"]}), "recipe"),
    (_with("recipe.merge_method", "blend"), "recipe.merge_method"),
    (_with("budget", {"trials": "many"}), "budget.trials"),
])
def test_a_bad_search_file_is_named_with_its_key(tmp_path, search, key):
    root = _conf_project(tmp_path, search)
    with pytest.raises(ConfigError) as err:
        plan(root, pin=False)
    assert str(err.value).startswith(f"{root / 'conf/searches/s.yaml'}: " + (f"key '{key}'" if key else ""))


def test_a_search_needs_a_validation_split(tmp_path):
    root = _conf_project(tmp_path, SEARCH, {"kind": "exact_match", "tasks": {"one": "t.jsonl"}})
    with pytest.raises(ConfigError, match=r"conf/eval/qa.yaml: key 'tasks.one': a search .* has none"):
        plan(root, pin=False)


def test_a_search_becomes_a_merge_of_the_graph(tmp_path):
    root = _conf_project(tmp_path, _with("constraints", [{"sum": ["x.weight", "y.weight"], "equals": 1}]))
    (root / "conf/publish").mkdir()
    (root / "conf/publish/p.yaml").write_text(yaml.safe_dump({"model": "s", "repo_id": "me/s"}))
    params, dvc_yaml = plan(root, pin=False)
    dvc = yaml.safe_load(dvc_yaml)
    stages = dvc["stages"]
    assert {"artifacts/searches/s/trials.png": {"cache": False}} in stages["search-s"]["outs"]
    assert "artifacts/searches/s/trials.png" in stages["publish-p"]["deps"]  # the card shows it
    labels = {name: (plot["x_label"], plot["y_label"]) for p in dvc["plots"] for name, plot in p.items()
              if name.startswith("search-s")}
    assert labels == {"search-s: objective per trial": ("trial", "validation objective"),
                      "search-s: x.weight": ("x.weight", "validation objective"),
                      "search-s: y.weight": ("y.weight", "validation objective")}
    assert "artifacts/searches/s/recipe.yaml" in stages["merge-s"]["deps"]
    assert {"eval-s", "report-s", "search-s"} <= set(stages)
    assert [p for p in stages["search-s"]["params"] if not p.startswith("code.")] == ["searches.s"]
    assert "v.jsonl" in stages["search-s"]["deps"] and "t.jsonl" not in stages["search-s"]["deps"]
    assert params["merges"]["s"]["base_model"] == "base" and "recipe" not in params["merges"]["s"]
    assert params["searches"]["s"]["objective"]["data"]["tasks"] == {"one": {"validation": "v.jsonl"}}


def test_constraints_and_gradients_shape_the_recipe(seed):
    from stages.search.space import parse_space

    rng = random.Random(seed)
    recipe = {"merge_method": "ties", "models": [
        {"model": "x", "parameters": {"weight": {"search": [0, 2]}, "density": {"search": [0.1, 1], "groups": 3}}},
        {"model": "y", "parameters": {"weight": {"search": [0, 2]}}}], "parameters": {"lambda": {"search": [0.5, 2], "log": True}}}
    space = parse_space(recipe, [{"sum": ["x.weight", "y.weight"], "equals": 1}], "f.yaml")
    assert [d.name for d in space.dims] == ["x.weight", "x.density.0", "x.density.1", "x.density.2", "y.weight", "lambda"]
    values = {d.name: rng.uniform(d.low, d.high) for d in space.dims}
    body = space.recipe(values)
    weights = [m["parameters"]["weight"] for m in body["models"]]
    assert abs(sum(weights) - 1) < 1e-12 and weights[0] / weights[1] == pytest.approx(values["x.weight"] / values["y.weight"])
    assert body["models"][0]["parameters"]["density"] == [values[f"x.density.{i}"] for i in range(3)]
    assert body["parameters"]["lambda"] == values["lambda"]
    assert recipe["models"][0]["parameters"]["weight"] == {"search": [0, 2]}  # the template is not changed


def test_trial_folders_of_killed_workers_are_removed_and_live_ones_kept(tmp_path):
    from stages.search.trials import remove_leftovers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f"trial-{dead.pid}-abc"
    live = tmp_path / f"trial-{os.getpid()}-def"
    for folder in (gone, live):
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "model.safetensors").write_bytes(b"x")
    remove_leftovers(tmp_path)
    assert not gone.exists() and live.is_dir()
