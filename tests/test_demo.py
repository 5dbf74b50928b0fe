"""The offline demo trains deterministically: two runs write byte-identical models (shortened
training; the real run differs only in step counts)."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import SHORT_DEMO

ROOT = Path(__file__).resolve().parents[1]


def _digests(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    for run in ("a", "b"):
        subprocess.run([sys.executable, "-c", SHORT_DEMO, str(root / run)], cwd=ROOT, check=True, capture_output=True)
    return root / "a", root / "b"


@pytest.mark.slow
def test_demo_training_is_byte_identical_across_runs(two_runs):
    a, b = (_digests(r) for r in two_runs)
    assert {"base/model.safetensors", "add/model.safetensors", "rev/tokenizer.json", "eval/get.test.jsonl",
            "eval/get.validation.jsonl"} <= set(a)
    assert a == b


@pytest.mark.slow
def test_demo_tokenizer_round_trips_every_character(two_runs):
    from transformers import PreTrainedTokenizerFast

    from stages.demo.stage import CHARS, encode

    tok = PreTrainedTokenizerFast.from_pretrained(str(two_runs[0] / "base"))
    assert tok(CHARS, add_special_tokens=False)["input_ids"] == encode(CHARS)
    assert tok.decode(encode("get:a4,k7?k=")) == "get:a4,k7?k="


def test_held_out_prompts_are_distinct_and_never_drawn_for_training(seed):
    """Every skill's validation and test prompts are disjoint, and the training draws of the base's
    mix and every expert's skill never produce one."""
    import random

    from stages.demo.stage import BASE_MIX, SPLITS, TRAIN, held_out

    held = held_out()
    prompts = set()
    for skill, splits in held.items():
        assert {s: len(c) for s, c in splits.items()} == SPLITS
        these = [p for cases in splits.values() for p, _ in cases]
        assert len(set(these)) == len(these)
        prompts |= set(these)
    rng = random.Random(seed)
    drawn = {task(rng)[0] for task in list(TRAIN.values()) * 3000 + BASE_MIX * 20}
    assert any(p.startswith("add:") for p in drawn) and not drawn & prompts
