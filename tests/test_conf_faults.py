"""Fault suite, conf/: whatever the files under conf/ hold, `python -m stages.compose` ends with exit
0, 1 or 2, and an error is one line `error: FILE[: key 'KEY']: ...` naming the file at fault; never
a traceback, a hang or unbounded memory (YAML alias bombs, deep nesting, interpolation bombs)."""
from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from stages.compose import stage as compose

MODELS = {"a": {"source": "local", "path": "x/a"}, "b": {"source": "hub", "repo_id": "org/b"}}
SOUP = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                            {"model": "b", "parameters": {"weight": 0.5}}]}
EVAL = {"kind": "exact_match", "tasks": {"x": "d/x.jsonl"}}
PUBLISH = {"model": "soup", "repo_id": "me/soup", "gates": {"min_score": {"qa/x": 0.5}}}


def _project(root: Path) -> Path:
    """A valid project: two models, one recipe, one suite, one publish target."""
    conf = root / "conf"
    files = {"config.yaml": {"defaults": ["mergeforge_schema", "_self_"], "demo": {"enabled": False}},
             "models/a.yaml": MODELS["a"], "models/b.yaml": MODELS["b"], "merges/soup.yaml": SOUP,
             "eval/qa.yaml": EVAL, "publish/p.yaml": PUBLISH}
    for rel, body in files.items():
        (conf / rel).parent.mkdir(parents=True, exist_ok=True)
        (conf / rel).write_text(yaml.safe_dump(body, sort_keys=False))
    return conf


def _compose(root: Path) -> tuple[int, str, float]:
    """compose's main on the project, with --check (no hub look-ups): exit code, stderr, seconds."""
    err = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stderr(err):
        rc = compose.main(["--root", str(root), "--check"])
    return rc, err.getvalue(), time.monotonic() - start


def _assert_one_error_line(rc: int, err: str, conf: Path, pattern: str = "") -> None:
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert re.match(re.escape(f"error: {conf}/") + pattern, err), err


def _bomb(levels: int = 9) -> bytes:
    """A billion laughs: 9 lines of aliases stand for 10**9 values."""
    lines = ["merge_method: linear", "parameters:", "  l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines).encode() + b"\n"


def _interpolated(template: str, levels: int = 9) -> bytes:
    """Each level uses the one below ten times: an interpolation bomb (strings or lists)."""
    ref = "${merges.soup.parameters.l%d}"
    lines = ["merge_method: linear", "parameters:", "  l0: xxxxxxxxxx"]
    lines += [f"  l{i}: " + template.replace("REF", ref % (i - 1)) for i in range(1, levels)]
    return "\n".join(lines).encode() + b"\n"


_SOUP_YAML = yaml.safe_dump(SOUP).encode()

FAULTS = {  # id: (file under conf/, its bytes, what the error line says after the file name)
    "not_utf8": ("merges/soup.yaml", _SOUP_YAML + b"description: \xff\n", r"merges/soup\.yaml: not UTF-8"),
    "alias_bomb": ("merges/soup.yaml", _bomb(), r"merges/soup\.yaml: invalid YAML: aliases expand"),
    "alias_self": ("merges/soup.yaml", b"a: &a [*a]\n", r"merges/soup\.yaml: invalid YAML: an alias refers to itself"),
    "deep_20000": ("merges/soup.yaml", b"x: " + b"[" * 20000 + b"]" * 20000 + b"\n",
                   r"merges/soup\.yaml: invalid YAML: nested deeper"),
    "deep_60": ("config.yaml", b"defaults: [mergeforge_schema]\nevaluate: " + b"{a: " * 60 + b"1" + b"}" * 60 + b"\n",
                r"config\.yaml: key 'evaluate(\.a)+': nested deeper than 32 levels"),
    "models_file_is_a_list": ("models/a.yaml", b"- source: local\n",
                              r"models/a\.yaml: a mapping of keys to values, got list"),
    "config_is_a_scalar": ("config.yaml", b"5\n", r"config\.yaml: a mapping of keys to values, got int"),
    "two_documents": ("merges/soup.yaml", _SOUP_YAML + b"---\nmerge_method: ties\n",
                      r"merges/soup\.yaml: one YAML document"),
    "duplicate_key": ("merges/soup.yaml", _SOUP_YAML + b"merge_method: ties\n",
                      r"merges/soup\.yaml: invalid YAML: found duplicate key merge_method"),
    "int_key": ("merges/soup.yaml", _SOUP_YAML + b"1: 2\n",
                r"merges/soup\.yaml: keys are names \(printable text\), got int 1"),
    "null_key_inside": ("merges/soup.yaml", _SOUP_YAML + b"parameters: {~: 1}\n",
                        r"merges/soup\.yaml: key 'parameters': keys are names \(printable text\), got NoneType None"),
    "set_value": ("models/a.yaml", b"source: local\npath: !!set {x}\n", r"models/a\.yaml: key 'path': text, a number"),
    "merge_method_list": ("merges/soup.yaml", yaml.safe_dump({**SOUP, "merge_method": [1]}).encode(),
                          r"merges/soup\.yaml: key 'merge_method': "),
    "dtype_mapping": ("merges/soup.yaml", yaml.safe_dump({**SOUP, "dtype": {"a": 1}}).encode(),
                      r"merges/soup\.yaml: key 'dtype': "),
    "models_int": ("merges/soup.yaml", yaml.safe_dump({**SOUP, "models": 5}).encode(),
                   r"merges/soup\.yaml: key 'models': "),
    "gates_list": ("publish/p.yaml", yaml.safe_dump({**PUBLISH, "gates": [1]}).encode(),
                   r"publish/p\.yaml: key 'gates': "),
    "tasks_int": ("eval/qa.yaml", yaml.safe_dump({**EVAL, "tasks": 3}).encode(), r"eval/qa\.yaml: key 'tasks': "),
    "tasks_nested": ("eval/qa.yaml", yaml.safe_dump({**EVAL, "tasks": {"x": {"a": 1}}}).encode(),
                     r"eval/qa\.yaml: key 'tasks\.x': a data file, or {validation: FILE, test: FILE} \(no key 'a'\)"),
    "gates_nested": ("publish/p.yaml", yaml.safe_dump({**PUBLISH, "gates": {"min_score": {"qa/x": [1]}}}).encode(),
                     r"publish/p\.yaml: key 'gates\.min_score\.qa/x': a float, got list"),
    "key_with_newline": ("merges/soup.yaml", yaml.safe_dump({**SOUP, "a\nb": 1}).encode(),
                         r"merges/soup\.yaml: keys are names \(printable text\), got str 'a\\nb'"),
    "no_schema_in_defaults": ("config.yaml", b"defaults: [_self_]\n",
                              r"config\.yaml: key 'defaults': a list that starts"),
    "defaults_not_a_list": ("merges/soup.yaml", _SOUP_YAML + b"defaults: 5\n", r"merges/soup\.yaml: key 'defaults': "),
    "defaults_self_package": ("config.yaml", b"defaults: [mergeforge_schema, _self_@x]\n",
                              r"config\.yaml: key 'defaults': "),
    "defaults_empty_group": ("config.yaml", b"defaults: [mergeforge_schema, _self_, {'': x}]\n",
                             r"config\.yaml: key 'defaults': "),
    "empty_recipe": ("merges/soup.yaml", b"", r"merges/soup\.yaml: key 'merge_method': Missing mandatory value"),
    "interpolation_string_bomb": ("merges/soup.yaml", _interpolated("'" + "REF" * 10 + "'"),
                                  r"merges/soup\.yaml: key 'parameters\.l\d': resolves to more than"),
    "interpolation_list_bomb": ("merges/soup.yaml", _interpolated("[" + ", ".join(["'REF'"] * 10) + "]"),
                                r"merges/soup\.yaml: key 'parameters\.l\d': resolves to more than"),
    "interpolation_chain": ("merges/soup.yaml", _interpolated("['REF']", levels=200),
                            r"merges/soup\.yaml: key 'parameters\.l\d+(\[0\])?': interpolations nest deeper"),
    "interpolation_cycle": ("merges/soup.yaml",
                            _SOUP_YAML + b"description: '${merges.soup.seed}'\nseed: '${.description}'\n",
                            r"merges/soup\.yaml: key '(description|seed)': interpolations refer to each other"),
    "interpolation_resolver": ("eval/qa.yaml", yaml.safe_dump({**EVAL, "limit": "${oc.env:HOME}"}).encode(),
                               r"eval/qa\.yaml: key 'limit': interpolations name a value"),
}


@pytest.mark.parametrize("rel, data, pattern", FAULTS.values(), ids=FAULTS.keys())
def test_each_fault_is_one_error_line_naming_file_and_key(tmp_path, rel, data, pattern):
    conf = _project(tmp_path)
    (conf / rel).write_bytes(data)
    rc, err, seconds = _compose(tmp_path)
    _assert_one_error_line(rc, err, conf, pattern)
    assert seconds < 1.5, seconds  # bombs are refused before anything expands them


def test_a_fifo_is_refused_not_read(tmp_path):
    """Reading a FIFO would block forever."""
    conf = _project(tmp_path)
    os.mkfifo(conf / "merges" / "pipe.yaml")
    _assert_one_error_line(*_compose(tmp_path)[:2], conf, r"merges/pipe\.yaml: not a regular file")


def test_a_file_pulled_in_by_a_defaults_list_is_read_safely(tmp_path):
    """A defaults list may name any file under conf/, so every one is checked, not only the groups."""
    conf = _project(tmp_path)
    (conf / "merges" / "soup.yaml").write_text(yaml.safe_dump({"defaults": ["/extra/bomb"], **SOUP}))
    (conf / "extra").mkdir()
    (conf / "extra" / "bomb.yaml").write_bytes(_bomb())
    _assert_one_error_line(*_compose(tmp_path)[:2], conf, r"extra/bomb\.yaml: invalid YAML: aliases expand")


def test_plain_interpolations_still_resolve(tmp_path):
    conf = _project(tmp_path)
    soup = copy.deepcopy(SOUP)
    soup["models"][1]["parameters"]["weight"] = "${merges.soup.seed}"
    (conf / "merges" / "soup.yaml").write_text(yaml.safe_dump({**soup, "seed": 3, "description": "seed ${.seed}"}))
    (conf / "eval" / "qa.yaml").write_text(yaml.safe_dump({**EVAL, "limit": "${merges.soup.seed}"}))
    cfg = compose.compose(conf)
    params = compose.resolved_params(cfg, compose.check(cfg, conf), tmp_path, pin=False)
    assert params["merges"]["soup"]["recipe"]["models"][1]["parameters"]["weight"] == 3
    assert params["evaluate"]["suites"]["qa"]["limit"] == 3


# --- fuzzing: random values at random keys of every kind of conf file, and as whole files ---

NAMES = st.sampled_from(
    ["models", "model", "parameters", "weight", "merge_method", "dtype", "base_model", "sweep", "key", "values",
     "source", "path", "repo_id", "revision", "kind", "tasks", "gates", "min_score", "build", "evaluate", "paths",
     "defaults", "seed", "device", "slices", "sources", "layer_range", "t", "density", "limit", "baseline", "x"])
TEXT = NAMES | st.text(st.characters(codec="ascii"), max_size=8) | st.text(max_size=4) | st.sampled_from(
    ["${merges.soup.seed}", "${nowhere}", "${.model}", "${oc.env:HOME}", "a", "b", "soup", "local", "hub", "cuda"])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
# mostly names the schema knows, so that edits get past the first checks to the later ones
KEYS = st.one_of(NAMES, NAMES, NAMES, NAMES, TEXT, st.integers(-1, 2))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=16)
SCHEMA_PATHS = st.sampled_from([  # where each file's values go; () replaces the whole file
    (), ("merge_method",), ("models",), ("models", 0), ("models", 0, "model"), ("models", 1, "parameters"),
    ("models", 1, "parameters", "weight"), ("parameters",), ("dtype",), ("base_model",), ("sweep",),
    ("sweep", "key"), ("sweep", "values"), ("seed",), ("device",), ("slices",), ("tokenizer",), ("source",),
    ("path",), ("repo_id",), ("revision",), ("kind",), ("tasks",), ("tasks", "x"), ("limit",), ("model",),
    ("gates",), ("gates", "min_score"), ("gates", "min_score", "qa/x"), ("build",), ("evaluate", "baseline"),
    ("paths", "artifacts"), ("demo",), ("defaults",), ("defaults", 1)])
FILES = {"config.yaml": {"defaults": ["mergeforge_schema", "_self_"], "demo": {"enabled": False}},
         "models/a.yaml": MODELS["a"], "merges/soup.yaml": SOUP, "eval/qa.yaml": EVAL, "publish/p.yaml": PUBLISH}


def _put(doc, path, value):
    """doc with value put at path where the path exists or can be made (a new mapping key; an int
    indexes a list); a whole-file replacement when the path is empty."""
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        if isinstance(node, dict) and isinstance(key, str):
            node = node.setdefault(key, {})
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return doc
    if isinstance(node, dict) and isinstance(path[-1], str) or isinstance(node, list) and path[-1] in range(len(node)):
        node[path[-1]] = value
    return doc


def _fuzz(edits) -> None:
    """Apply the edits to a fresh copy of the valid project and compose it: exit 0, 1 or 2, and an
    error names a file of conf/."""
    with tempfile.TemporaryDirectory() as tmp:
        conf = _project(Path(tmp))
        docs = copy.deepcopy(FILES)
        for rel, path, value in edits:
            docs[rel] = _put(docs[rel], path, value)
        for rel, doc in docs.items():
            (conf / rel).write_text(yaml.safe_dump(doc, sort_keys=False))
        rc, err, seconds = _compose(Path(tmp))
        assert rc in (0, 1, 2), err
        if rc == 2:
            _assert_one_error_line(rc, err, conf)
        assert seconds < 5, seconds


def _edits(files):
    paths = SCHEMA_PATHS | st.lists(NAMES | st.integers(0, 1), max_size=4)
    return st.lists(st.tuples(st.sampled_from(files), paths, SCALARS | VALUES), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_edits(["merges/soup.yaml", "models/a.yaml"]))
def test_fuzz_models_and_merges_compose_or_name_the_file(edits):
    _fuzz(edits)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_edits(sorted(FILES)))
def test_fuzz_every_conf_file_composes_or_names_the_file(edits):
    _fuzz(edits)


@pytest.mark.parametrize("suite, key", [
    ({"kind": "exact_match", "tasks": {"x": "a.jsonl"}, "split": {"validation": 1.5}}, "split.validation"),
    ({"kind": "lm_eval", "tasks": {"x": "task.yaml"}, "split": {"validation": 0.5}}, "tasks.x"),
    ({"kind": "exact_match", "tasks": {"x": {"validation": "v.jsonl"}}}, "tasks.x"),
])
def test_a_bad_split_names_the_suite_file_and_key(tmp_path, suite, key):
    from stages.common.errors import ConfigError
    from stages.compose.eval_conf import check_suite

    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'eval' / 'qa.yaml'}: key '{key}'")):
        check_suite("qa", suite, tmp_path)
