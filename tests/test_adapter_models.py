"""conf/models `adapter:`: a model that is a checkpoint with a PEFT LoRA adapter merged in, built by
its fetch stage (adapters local or from the hub, pinned), read by recipes like any other model."""
from __future__ import annotations

import mlflow
import pytest
import torch
import yaml

from pipeline import ALWAYS, hub_cache, new_project, repro
from stages.compose import stage as compose
from stages.common.errors import ConfigError
from test_compose import _conf
from test_lora_inputs import make_adapter, peft_merged
from tiny import load_dir, write_causal_lm

LORA = {"source": "local", "path": "x/base", "adapter": {"source": "local", "path": "x/lora"}}


def test_an_adapter_model_gets_a_fetch_stage_over_both_folders(tmp_path):
    conf = _conf(tmp_path, {"base": {"source": "local", "path": "x/base"}, "tuned": LORA},
                 {"soup": {"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 1.0}},
                                                               {"model": "tuned", "parameters": {"weight": 1.0}}]}})
    cfg = compose.compose(conf)
    graph = compose.check(cfg, conf)
    params = compose.resolved_params(cfg, graph, tmp_path)
    assert params["models"]["tuned"]["adapter"] == {"source": "local", "path": "x/lora"}
    assert params["merges"]["soup"]["inputs"] == {"base": "x/base", "tuned": "artifacts/models/tuned"}
    stages = yaml.safe_load(compose.render_dvc_yaml(graph, params, cfg, conf, tmp_path))["stages"]
    fetch = stages["fetch-tuned"]
    assert {"x/base", "x/lora"} <= set(fetch["deps"]) and "models.tuned.adapter" in fetch["params"]
    assert fetch["outs"] == ["artifacts/models/tuned"] and "fetch-base" not in stages
    assert "artifacts/models/tuned" in stages["merge-soup"]["deps"]


@pytest.mark.parametrize("adapter, pattern", [
    ({"source": "local"}, r"conf/models/tuned\.yaml: key 'adapter\.path': a local source needs the adapter directory"),
    ({"source": "hub", "repo_id": "nope"}, r"conf/models/tuned\.yaml: key 'adapter\.repo_id': .*'org/name'"),
    ({"source": "ftp", "path": "x"}, r"conf/models/tuned\.yaml: key 'adapter\.source': 'local' or 'hub'"),
    ({"source": "local", "pth": "x"}, r"conf/models/tuned\.yaml: key 'adapter\.pth'"),
])
def test_adapter_config_errors_name_file_and_key(tmp_path, adapter, pattern):
    conf = _conf(tmp_path, {"tuned": {**LORA, "adapter": adapter}})
    with pytest.raises(ConfigError, match=pattern):
        compose.check(compose.compose(conf), conf)


@pytest.mark.slow
def test_adapters_local_and_from_the_hub_cache_build_rebuild_and_are_recorded(tmp_path, seed, mlflow_template):
    base = write_causal_lm(tmp_path / "src" / "base", seed)
    make_adapter(base, tmp_path / "src" / "hub_lora", seed + 1, r=4, lora_alpha=8)
    make_adapter(base, tmp_path / "src" / "my_lora", seed + 2, r=2, lora_alpha=2, target_modules=["up_proj"])
    cache = tmp_path / "hf"
    sha = hub_cache(cache, "org/lora", tmp_path / "src" / "hub_lora")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    project = new_project(
        tmp_path / "project",
        {"base": base, "tuned": {"source": "local", "path": str(base), "adapter": {"source": "hub", "repo_id": "org/lora"}},
         "mine": {"source": "local", "path": str(base), "adapter": {"source": "local", "path": str(tmp_path / "src" / "my_lora")}}},
        {"ta": {"merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32",
                "models": [{"model": "tuned", "parameters": {"weight": 0.7}}, {"model": "mine", "parameters": {"weight": 0.4}}]}},
        env, mlflow_db=mlflow_template)
    ran, _ = repro(project, env)
    assert ran == ALWAYS | {"fetch-tuned", "fetch-mine", "merge-ta"}
    b = load_dir(base)
    expected = {name: peft_merged(base, tmp_path / "src" / src) for name, src in (("tuned", "hub_lora"), ("mine", "my_lora"))}
    for name in expected:
        got = load_dir(project / "artifacts/models" / name)
        for k, v in got.items():
            torch.testing.assert_close(v, expected[name][k], rtol=1e-6, atol=1e-6)
    merged = load_dir(project / "artifacts/merges/ta")
    for k, v in merged.items():
        want = b[k] + 0.7 * (expected["tuned"][k] - b[k]) + 0.4 * (expected["mine"][k] - b[k])
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6)

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mergeforge")
    records = {m.tags["mergeforge.name"]: m for m in client.search_logged_models([experiment.experiment_id])}
    assert records["tuned"].tags["mergeforge.adapter.repo_id"] == "org/lora"
    assert records["tuned"].tags["mergeforge.adapter.sha"] == sha
    assert "with the LoRA adapter `org/lora` at commit" in records["tuned"].tags["mlflow.note.content"]

    assert repro(project, env)[0] == ALWAYS
    make_adapter(base, tmp_path / "src" / "my_lora", seed + 3, r=2, lora_alpha=2, target_modules=["up_proj"])
    assert repro(project, env)[0] == ALWAYS | {"fetch-mine", "merge-ta"}
    assert not torch.equal(load_dir(project / "artifacts/merges/ta")["model.layers.0.mlp.up_proj.weight"],
                           merged["model.layers.0.mlp.up_proj.weight"])
