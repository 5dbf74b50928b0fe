"""conf/exports: a merge exported as a GGUF (with its Modelfile and LM Studio's layout) or as a LoRA
adapter over its base, by the stage export-NAME; config errors name the file and key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from stages.common.errors import ConfigError
from stages.compose.conf_files import check_files
from stages.compose import stage as compose
from stages.export.stage import build
from test_compose import _conf
from test_export_gguf import demo_like
from tiny import load_dir

MODELS = {"a": {"source": "local", "path": "x/a"}, "b": {"source": "local", "path": "x/b"}}
TA = {"merge_method": "task_arithmetic", "base_model": "a", "models": [{"model": "b", "parameters": {"weight": 1.0}}]}
SOUP = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                            {"model": "b", "parameters": {"weight": 1.0}}]}


def _composed(tmp_path, exports, merges=None):
    conf = _conf(tmp_path, MODELS, merges or {"ta": TA, "soup": SOUP})
    (conf / "exports").mkdir()
    for name, body in exports.items():
        (conf / "exports" / f"{name}.yaml").write_text(yaml.safe_dump(body))
    cfg = compose.compose(conf)
    graph = compose.check(cfg, conf)
    return cfg, graph, compose.resolved_params(cfg, graph, tmp_path), conf


def test_exports_become_stages_over_the_merge_and_its_base(tmp_path):
    cfg, graph, params, conf = _composed(tmp_path, {"g": {"model": "ta", "kind": "gguf"},
                                                    "l": {"model": "ta", "kind": "lora", "rank": 8}})
    assert params["exports"]["g"] == {"model": "ta", "kind": "gguf", "type": "q8_0", "publisher": "mergeforge"}
    assert params["exports"]["l"] == {"model": "ta", "kind": "lora", "rank": 8, "embeddings": None, "norms": False,
                                      "base": "a"}  # the recipe's base_model
    stages = yaml.safe_load(compose.render_dvc_yaml(graph, params, cfg, conf, tmp_path))["stages"]
    assert "artifacts/merges/ta" in stages["export-g"]["deps"] and "x/a" not in stages["export-g"]["deps"]
    assert {"artifacts/merges/ta", "x/a"} <= set(stages["export-l"]["deps"])
    assert "exports.l" in stages["export-l"]["params"] and stages["export-l"]["outs"] == ["artifacts/exports/l"]


@pytest.mark.parametrize("export, pattern", [
    ({"model": "a", "kind": "gguf"}, r"exports/e\.yaml: key 'model': no recipe .*only merges are exported"),
    ({"model": "ta", "kind": "onnx"}, r"exports/e\.yaml: key 'kind': one of gguf, lora, got 'onnx'"),
    ({"model": "ta", "kind": "gguf", "type": "q4_k"}, r"exports/e\.yaml: key 'type': one of f32, f16, bf16, q8_0"),
    ({"model": "ta", "kind": "lora", "rank": 0}, r"exports/e\.yaml: key 'rank': a LoRA rank is at least 1"),
    ({"model": "ta", "kind": "lora", "embeddings": "some"}, r"exports/e\.yaml: key 'embeddings': null, lora or full"),
    ({"model": "ta", "kind": "lora", "base": "c"}, r"exports/e\.yaml: key 'base': no model or recipe 'c'"),
    ({"model": "soup", "kind": "lora"}, r"exports/e\.yaml: key 'base': recipe 'soup' has no base_model"),
    ({"model": "ta", "kind": "gguf", "typ": "f16"}, r"exports/e\.yaml: key 'typ'"),
])
def test_export_errors_name_file_and_key(tmp_path, export, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _composed(tmp_path, {"e": export})


@pytest.mark.slow
def test_the_stage_writes_a_gguf_and_an_adapter_that_peft_merges_back(tmp_path, seed, monkeypatch):
    """build(): kind gguf gives the file, Modelfile and LM Studio layout; kind lora at full rank
    gives an adapter whose PEFT merge is the merge itself."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    base = demo_like(tmp_path / "x" / "a", seed)
    tuned = demo_like(tmp_path / "artifacts" / "merges" / "ta", seed + 1)
    params = {"artifacts": "artifacts", "models": {"a": {"source": "local", "path": "x/a"}}, "merges": {"ta": {}},
              "exports": {"g": {"model": "ta", "kind": "gguf", "type": "f32", "publisher": "me"},
                          "l": {"model": "ta", "kind": "lora", "rank": 64, "embeddings": "full", "norms": True,
                                "base": "a"}}}
    out = build("g", params)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == {
        "model.gguf", "Modelfile", "lmstudio/me/ta/ta-F32.gguf"}
    assert "FROM ./model.gguf" in (out / "Modelfile").read_text()
    adapter = build("l", params)
    report = json.loads((adapter / "extraction.json").read_text())
    assert report["summary"]["max_relative_error"] < 1e-5 and report["uncaptured"]["count"] == 0
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    want = load_dir(tuned)
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-5)


def test_an_export_that_cannot_be_recorded_is_removed(tmp_path, seed, monkeypatch):
    """The stage records each export in MLflow; when that fails, the built folder goes too, so DVC
    caches no export the lineage lacks."""
    from stages.common.errors import LineageError
    from stages.export import stage

    monkeypatch.chdir(tmp_path)
    demo_like(tmp_path / "artifacts" / "merges" / "ta", seed)
    params = {"artifacts": "artifacts", "models": {}, "merges": {"ta": {}},
              "exports": {"g": {"model": "ta", "kind": "gguf", "type": "f32", "publisher": "me"}}}
    out = tmp_path / "artifacts" / "exports" / "g"
    built = []

    def refuse(name, params):
        built.append((out / "model.gguf").is_file())
        raise LineageError(f"MLflow at sqlite:///x: cannot record export '{name}'")
    monkeypatch.setattr(stage.tracking, "connect", lambda: None)
    monkeypatch.setattr(stage.tracking, "record_export", refuse)
    with pytest.raises(LineageError, match="cannot record export 'g'"):
        stage.build_and_record("g", params)
    assert built == [True] and not out.exists()


EXAMPLE_GROUPS = {"local_model": "models", "hub_model": "models", "adapter_model": "models", "linear": "merges",
                  "ties": "merges", "hub_recipe": "merges", "search": "searches", "publish": "publish",
                  "export": "exports"}


@pytest.mark.parametrize("folder", ["conf/examples", "stages/new_project/template/conf/examples"])
def test_every_example_is_typed_by_its_group_schema(tmp_path, folder):
    """The commented examples users copy into conf/ are valid files of the group they name."""
    examples = sorted((Path(__file__).resolve().parents[1] / folder).glob("*.yaml"))
    assert {"adapter_model", "export"} <= {p.stem for p in examples}
    for example in examples:
        target = tmp_path / "conf" / EXAMPLE_GROUPS[example.stem] / example.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(example.read_bytes())
    check_files(tmp_path / "conf")
    (tmp_path / "conf" / "exports" / "export.yaml").write_text("model: soup\nkind: gguf\ntyp: f16\n")
    with pytest.raises(ConfigError, match=r"export\.yaml.*typ"):  # the check reads these files
        check_files(tmp_path / "conf")
