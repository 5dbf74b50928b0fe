"""End to end, in a temporary git + DVC project: `dvc repro` builds what conf/ asks, reruns exactly
what an edit affects, fetches hub models from an offline cache, and notices a moved branch."""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import ALWAYS, hub_cache, new_project, read_conf, repro, run, write_conf
from tiny import finetune, fresh_seed, llama_state, load_dir, write_model

pytestmark = pytest.mark.slow  # end-to-end: DVC projects built and run (`pytest -m 'not slow'` skips them)


def _ties(density=0.5):
    return {"merge_method": "ties", "base_model": "base", "parameters": {"normalize": True},
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": density}} for m in ("m0", "m1")]}


def _recipes():
    return {
        "soup": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in ("m0", "m1")]},
        "ties": _ties(),
        "blend": {"merge_method": "linear", "models": [{"model": "ties", "parameters": {"weight": 0.5}},
                                                       {"model": "soup", "parameters": {"weight": 0.5}}]},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory, mlflow_template):
    """A project with a base, two fine-tunes and three recipes (one a merge of merges), built once."""
    root = tmp_path_factory.mktemp("pipeline")
    seed = fresh_seed()
    base = llama_state(seed=seed)
    models = {"base": write_model(root / "src" / "base", base)}
    for i in range(2):
        models[f"m{i}"] = write_model(root / "src" / f"m{i}", finetune(base, seed + i + 1))
    project = new_project(root / "project", models, _recipes(), mlflow_db=mlflow_template)
    ran, _ = repro(project)
    return project, ran


@pytest.fixture
def project(built, tmp_path):
    """A private copy of the built project (git, DVC cache and outputs included)."""
    copy = tmp_path / "project"
    shutil.copytree(built[0], copy, symlinks=True)
    return copy


def params_sha(project, model):
    return yaml.safe_load((project / "params.yaml").read_text())["models"][model]["sha"]


def test_fresh_repro_builds_every_stage(built):
    project, ran = built
    assert ran == ALWAYS | {"merge-soup", "merge-ties", "merge-blend"}  # local models: read in place
    assert not (project / "artifacts/models").exists()
    soup, m0, m1 = (load_dir(p) for p in (project / "artifacts/merges/soup", project.parent / "src/m0",
                                       project.parent / "src/m1"))
    for name, t in soup.items():
        torch.testing.assert_close(t, (m0[name] + m1[name]) / 2)
    blend, ties = load_dir(project / "artifacts/merges/blend"), load_dir(project / "artifacts/merges/ties")
    for name, t in blend.items():
        torch.testing.assert_close(t, (ties[name] + soup[name]) / 2)


def test_second_repro_runs_nothing_but_the_compose_check(project):
    ran, proc = repro(project)
    assert ran == ALWAYS, proc.stdout


def test_recipe_edit_reruns_that_merge_and_its_dependents_only(project):
    write_conf(project, "merges", "ties", _ties(density=0.3))
    ran, _ = repro(project)
    assert ran == ALWAYS | {"merge-ties", "merge-blend"}


def test_edit_that_changes_no_build_input_reruns_nothing(project):
    body = read_conf(project, "merges", "soup")
    body["description"] = "the same soup, described"
    write_conf(project, "merges", "soup", body)
    write_conf(project, "models", "m1", {**read_conf(project, "models", "m1"), "description": "a note"})
    ran, _ = repro(project)
    assert ran == ALWAYS


def test_new_recipe_says_run_again_then_builds_only_it(project):
    write_conf(project, "merges", "slerp", {"merge_method": "slerp", "base_model": "m0", "parameters": {"t": 0.3},
                                            "models": [{"model": "m0"}, {"model": "m1"}]})
    ran, proc = repro(project, check=False)
    assert proc.returncode != 0 and "run `dvc repro` again" in proc.stderr + proc.stdout
    assert "added merge-slerp" in proc.stderr + proc.stdout
    ran, _ = repro(project)
    assert ran == ALWAYS | {"merge-slerp"}
    assert (project / "artifacts/merges/slerp/model.safetensors").is_file()


def test_removed_and_rewired_recipes_change_the_graph(project):
    (project / "conf/merges/blend.yaml").unlink()
    _, proc = repro(project, check=False)
    assert proc.returncode != 0 and "removed merge-blend" in proc.stderr + proc.stdout
    assert repro(project)[0] == ALWAYS
    write_conf(project, "merges", "soup", {"merge_method": "linear", "models": [
        {"model": "ties", "parameters": {"weight": 1.0}}, {"model": "m1", "parameters": {"weight": 1.0}}]})
    _, proc = repro(project, check=False)
    assert proc.returncode != 0 and "rewired" in proc.stderr + proc.stdout
    assert repro(project)[0] == ALWAYS | {"merge-soup"}


def test_exp_run_with_a_conf_override(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "built"], project)
    proc = run(["dvc", "exp", "run", "-S", "conf/merges/soup.yaml:models.0.parameters.weight=3.0"], project)
    assert "Running stage 'merge-soup'" in proc.stdout and "Running stage 'merge-ties'" not in proc.stdout
    soup = load_dir(project / "artifacts/merges/soup")
    m0, m1 = (load_dir(Path(read_conf(project, "models", m)["path"])) for m in ("m0", "m1"))
    for name, t in soup.items():
        torch.testing.assert_close(t, (3 * m0[name] + m1[name]) / 4)


def test_hub_model_from_offline_cache_moved_branch_and_no_token_written(tmp_path, seed, mlflow_template):
    cache = tmp_path / "hf"
    base = llama_state(seed=seed)
    src = {"base": write_model(tmp_path / "src" / "base", base),
           "v1": write_model(tmp_path / "src" / "v1", finetune(base, seed + 1)),
           "v2": write_model(tmp_path / "src" / "v2", finetune(base, seed + 2))}
    hub_cache(cache, "org/tuned", src["v1"])
    token = "hf_" + random.randbytes(12).hex()  # planted: must not reach any file the pipeline writes
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_TOKEN": token}
    project = new_project(tmp_path / "project", {"base": src["base"], "tuned": {"source": "hub", "repo_id": "org/tuned"}},
                          {"ta": {"merge_method": "task_arithmetic", "base_model": "base",
                                  "models": [{"model": "tuned", "parameters": {"weight": 1.0}}]}},
                          env, mlflow_db=mlflow_template)
    ran, _ = repro(project, env)
    assert ran == ALWAYS | {"fetch-tuned", "merge-ta"}
    fetched = project / "artifacts/models/tuned/model.safetensors"
    blob = cache / "models--org--tuned" / "snapshots" / params_sha(project, "tuned") / "model.safetensors"
    assert fetched.resolve().stat().st_ino == blob.resolve().stat().st_ino  # a link, not a second copy
    v1 = load_file(str(src["v1"] / "model.safetensors"))
    assert all(torch.equal(t, v1[k]) for k, t in load_dir(project / "artifacts/merges/ta").items())
    assert repro(project, env)[0] == ALWAYS
    sha2 = hub_cache(cache, "org/tuned", src["v2"])  # the branch moves to a new commit
    ran, _ = repro(project, env)
    assert ran == ALWAYS | {"fetch-tuned", "merge-ta"}
    v2 = load_file(str(src["v2"] / "model.safetensors"))
    assert all(torch.equal(t, v2[k]) for k, t in load_dir(project / "artifacts/merges/ta").items())
    assert sha2 in (project / "params.yaml").read_text()
    written = [f for f in project.rglob("*") if f.is_file() and ".git" not in f.parts]
    assert written and not [f for f in written if token.encode() in f.read_bytes()]


def _soup_with_hub_model(tmp_path, seed, mlflow_template, name: str) -> tuple[Path, dict]:
    """A project whose one recipe averages a local base with hub model org/NAME from the cache tmp_path/hf."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
    base = write_model(tmp_path / "base", llama_state(seed=seed))
    soup = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1}} for m in ("base", name)]}
    project = new_project(tmp_path / "project", {"base": base, name: {"source": "hub", "repo_id": f"org/{name}"}},
                          {"soup": soup}, env, mlflow_db=mlflow_template)
    return project, env


def test_hub_repo_with_only_pickle_weights_is_refused(tmp_path, seed, mlflow_template):
    cache = tmp_path / "hf"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    torch.save(llama_state(seed=seed), pickled / "pytorch_model.bin")
    hub_cache(cache, "org/old", pickled)
    project, env = _soup_with_hub_model(tmp_path, seed, mlflow_template, "old")
    _, proc = repro(project, env, check=False)
    assert proc.returncode != 0 and "only pickle weights (pytorch_model.bin)" in proc.stderr + proc.stdout
    assert not (project / "artifacts/models/old").exists()


def test_incompatible_hub_model_fails_before_its_weights_are_fetched(tmp_path, seed, mlflow_template):
    wide = write_model(tmp_path / "wide", llama_state(seed=seed, inter=14))
    hub_cache(tmp_path / "hf", "org/wide", wide)
    project, env = _soup_with_hub_model(tmp_path, seed, mlflow_template, "wide")
    _, proc = repro(project, env, check=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "merge 'soup'" in out and "mlp.down_proj.weight" in out and "[8, 14]" in out
    assert not (project / "artifacts/models/wide").exists()
