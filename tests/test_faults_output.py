"""Fault suite, outputs: a merge never destroys or writes over anything but its own earlier
output, checks the disk before it works, and cleans up after a crashed run."""
from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergekit_ops import merge
from mergekit_ops import engine as engine_module
from mergekit_ops import outdir
from mergekit_ops.errors import MergeError, RecipeError
from mergekit_ops.outdir import MARKER
from tiny import llama_state, load_dir, tree_digests, write_family, write_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path, seed):
    """A folder holding two models and a linear recipe of them (relative paths, as users write)."""
    models = write_family(tmp_path, llama_state(seed=seed), seed)
    recipe = write_recipe(tmp_path / "recipe.yml", {"merge_method": "linear", "models": [
        {"model": "m0", "parameters": {"weight": 1.0}}, {"model": "m2", "parameters": {"weight": 0.5}}]})
    return tmp_path, models, recipe


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mergekit_ops", "--quiet", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_out_dir_dot_beside_the_recipe_and_models_is_refused_and_nothing_is_touched(workspace):
    root, _, recipe = workspace
    before = tree_digests(root)
    result = _cli([recipe.name, "."], cwd=root)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: output directory") and "Traceback" not in result.stderr
    assert tree_digests(root) == before


@pytest.mark.parametrize("where,words", [
    (lambda m: m["m0"], "is model 'm0'"),
    (lambda m: m["m0"] / "sub", "lies inside model 'm0'"),
    (lambda m: m["m0"].parent, "holds"),
])
def test_out_dir_that_is_in_or_around_an_input_is_refused(workspace, monkeypatch, where, words):
    root, models, recipe = workspace
    monkeypatch.chdir(root.parent)
    before = tree_digests(root)
    with pytest.raises(MergeError, match=words):
        merge(recipe, where(models))
    assert tree_digests(root) == before


def test_out_dir_that_is_a_file_a_symlink_or_a_foreign_folder_is_refused(workspace, monkeypatch):
    root, models, recipe = workspace
    monkeypatch.chdir(root)
    (root / "notes.txt").write_text("mine")
    (root / "link").symlink_to(models["base"])
    (root / "photos").mkdir()
    (root / "photos" / "cat.jpg").write_bytes(random.randbytes(64))
    before = tree_digests(root)
    with pytest.raises(MergeError, match="exists and is not a directory"):
        merge(recipe, root / "notes.txt")
    with pytest.raises(MergeError, match="exists and is not a directory"):
        merge(recipe, root / "link")
    with pytest.raises(MergeError, match=f"not empty and holds no earlier merge output \\(no {MARKER} file"):
        merge(recipe, root / "photos")
    assert tree_digests(root) == before


def test_an_earlier_output_or_an_empty_folder_is_replaced(workspace, monkeypatch):
    root, models, recipe = workspace
    monkeypatch.chdir(root)
    (root / "empty").mkdir()
    merge(recipe, root / "empty")
    assert (root / "empty" / MARKER).is_file()
    first = tree_digests(root / "empty")
    (root / "empty" / "stale.txt").write_text("from an earlier run")
    merge(recipe, root / "empty")
    assert tree_digests(root / "empty") == first


def test_document_names_cannot_leave_the_intermediate_folder(workspace, monkeypatch):
    root, _, _ = workspace
    monkeypatch.chdir(root)
    for name in ("../escaped", str(root / "elsewhere")):
        recipe = write_recipe(root / "multi.yml", f"name: {name}\nmerge_method: linear\nmodels: [m0, m1]\n"
                                                  f"---\nmerge_method: linear\nmodels: ['{name}', m2]\n")
        before = tree_digests(root)
        with pytest.raises(RecipeError, match="not a plain name"):
            merge(recipe, root / "out")
        assert tree_digests(root) == before


def test_a_merge_that_cannot_fit_fails_before_reading_a_weight(workspace, monkeypatch):
    root, _, recipe = workspace
    monkeypatch.chdir(root)
    merge(recipe, root / "out")
    before = tree_digests(root)
    stats = os.statvfs(root)

    class Small:  # the filesystem as statvfs would report it with 1000 bytes free
        f_bavail, f_frsize = 1000 // stats.f_frsize or 1, stats.f_frsize

    def no_reads(*_):
        raise AssertionError("a weight was read")
    monkeypatch.setattr(outdir.os, "statvfs", lambda _: Small)
    monkeypatch.setattr(engine_module, "read_tensor", no_reads)
    with pytest.raises(MergeError, match=rf"not enough disk space for {root / 'out'}: the output needs "
                                         rf"[\d,]+ bytes, {root} has [\d,]+ bytes free"):
        merge(recipe, root / "out")
    assert tree_digests(root) == before


@pytest.fixture
def small_disk(tmp_path):
    """mount(bytes): a tmpfs of that size (needs root, as CI and these machines have; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()

    def mount(size: int) -> Path:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        return mnt
    yield mount
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_real_full_disk_is_a_one_line_error_up_front_and_midway(tmp_path, seed, small_disk, monkeypatch):
    models = write_family(tmp_path / "models", llama_state(hidden=64, inter=96, seed=seed), seed)
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(models[m]), "parameters": {"weight": 1.0}} for m in ("m0", "m1")]})
    size = sum(f.stat().st_size for f in merge(recipe, tmp_path / "probe").iterdir())
    disk = small_disk(size * 3 // 2)
    merge(recipe, disk / "out")  # fits once, not twice
    before = tree_digests(disk)
    result = _cli([str(recipe), str(disk / "second")], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: not enough disk space for {disk / 'second'}"), result.stderr
    monkeypatch.setattr(outdir, "check_space", lambda *_: 10**12)  # a disk that fills anyway
    with pytest.raises(MergeError, match=f"the disk filled up while writing {disk / 'second'}"):
        merge(recipe, disk / "second")
    assert tree_digests(disk) == before


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_dead_processes_are_removed_and_reported(workspace, monkeypatch, caplog):
    root, _, recipe = workspace
    monkeypatch.chdir(root)
    dead, alive = _dead_pid(), os.getppid()
    for name in (f".out.tmp-{dead}", f".out.intermediates-{dead}", f".out.tmp-{alive}", f".other.tmp-{dead}"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(random.randbytes(100))
    with caplog.at_level(logging.WARNING, logger="mergekit_ops"):
        merge(recipe, root / "out")
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert left == [f".other.tmp-{dead}", f".out.tmp-{alive}"]
    assert sorted(r.getMessage().split(",")[0] for r in caplog.records) == sorted(
        f"removed {root / n}" for n in (f".out.tmp-{dead}", f".out.intermediates-{dead}"))


def test_an_output_moved_aside_by_a_dead_run_is_restored(workspace, monkeypatch, caplog):
    root, _, recipe = workspace
    monkeypatch.chdir(root)
    merge(recipe, root / "out")
    first = tree_digests(root / "out")
    dead = _dead_pid()
    (root / "out").rename(root / f".out.old-{dead}")  # killed between the two renames of the swap
    (root / f".out.tmp-{dead}").mkdir()
    with caplog.at_level(logging.WARNING, logger="mergekit_ops"):
        outdir.clean_leftovers(root / "out")
    assert tree_digests(root / "out") == first
    assert not [p for p in root.iterdir() if p.name.startswith(".out.")]
    assert any("restored the earlier output" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_kill_9_mid_merge_keeps_the_previous_output_and_the_next_run_cleans_up(tmp_path, seed):
    models = write_family(tmp_path, llama_state(layers=8, hidden=256, inter=512, seed=seed), seed)
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "dare_ties", "base_model": str(models["base"]),
                                               "models": [{"model": str(models[m]), "parameters": {
                                                   "weight": 0.5, "density": 0.5}} for m in ("m0", "m1", "m2")]})
    assert _cli([str(recipe), str(tmp_path / "out")], cwd=tmp_path).returncode == 0
    previous = tree_digests(tmp_path / "out")
    for delay in (0.3, 0.8, 1.5):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "mergekit_ops", "--quiet", "--seed", "1", str(recipe),
                                 str(tmp_path / "out")], cwd=tmp_path, env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = tree_digests(tmp_path / "out")
        assert now == previous or load_dir(tmp_path / "out").keys() == load_dir(tmp_path / "m0").keys()
        previous = now
    result = _cli([str(recipe), str(tmp_path / "out")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_stage_removes_the_temporary_folder_an_interrupted_run_left_and_says_so(tmp_path, capsys):
    from stages.common.atomic import fresh_temp

    out = tmp_path / "artifacts" / "models" / "m"
    assert fresh_temp(out) == out.with_name(".m.tmp") and capsys.readouterr().err == ""
    out.with_name(".m.tmp").mkdir(parents=True)
    (out.with_name(".m.tmp") / "model.safetensors").write_bytes(random.randbytes(64))
    assert not fresh_temp(out).exists()
    assert capsys.readouterr().err == f"removed {out.with_name('.m.tmp')}, left by an interrupted run\n"
