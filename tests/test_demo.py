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
    assert {"base/model.safetensors", "add/model.safetensors", "rev/tokenizer.json", "eval/get.jsonl"} <= set(a)
    assert a == b


@pytest.mark.slow
def test_demo_tokenizer_round_trips_every_character(two_runs):
    from transformers import PreTrainedTokenizerFast

    from stages.demo.stage import CHARS, encode

    tok = PreTrainedTokenizerFast.from_pretrained(str(two_runs[0] / "base"))
    assert tok(CHARS, add_special_tokens=False)["input_ids"] == encode(CHARS)
    assert tok.decode(encode("get:a4,k7?k=")) == "get:a4,k7?k="
