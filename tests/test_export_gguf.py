"""stages/export: the GGUF that transformers reads back and llama.cpp (llama-cpp-python) runs, with the
same logits, greedy answers and token ids as the safetensors model; the Modelfile; LM Studio's layout.

Models are tiny random Llamas shaped like the demo's (stages/demo), with its character tokenizer,
a fresh seed per test. Tolerances are max |logit difference| over a few prompts, in logits whose
largest magnitude is about 12 (weights scaled up so that greedy answers vary, as large as the
trained demo's); the bounds are 2-3x the largest differences measured (docs/export.md).
Nothing here reaches the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.demo.stage import SHAPE, VOCAB, encode, tokenizer_files
from stages.export.errors import ExportError
from stages.export.gguf_export import export
from tiny import tree_digests, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["12+34=", "add:7+5+3=", "rev:kqzm=", "get:abc, ok? yes. a>b; c"]
# max |logit difference|, transformers on the GGUF vs transformers on the safetensors, by type
READ_BACK_TOL = {"f32": 1e-5, "f16": 0.03, "bf16": 0.25, "q8_0": 0.6}
# llama.cpp vs transformers on the same (dequantized) GGUF weights: the runtime's own arithmetic
# (ggml keeps the KV cache in F16, rounds activations to F16 for F16 weights, to Q8_0 blocks for Q8_0)
RUNTIME_TOL = {"f32": 0.02, "f16": 0.03, "bf16": 0.2, "q8_0": 0.5}


def required(module: str, why: str):
    """pytest.importorskip, except in CI (MERGEFORGE_REQUIRE_ALL=1), where what is missing fails the test."""
    if os.environ.get("MERGEFORGE_REQUIRE_ALL") == "1":
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module, reason=why)


def demo_like(path: Path, seed: int, arch: str = "llama", tokenizer: dict | None = None, **shape) -> Path:
    """A random model of the demo's shape, saved as transformers saves one, with the demo's tokenizer
    (or the tokenizer.json given, whose vocabulary then sizes the model)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    torch.manual_seed(seed)
    files = tokenizer_files() | ({"tokenizer.json": tokenizer} if tokenizer else {})
    vocab_size = len(files["tokenizer.json"]["model"]["vocab"])
    config = config_cls(vocab_size=vocab_size, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        **(SHAPE | shape))
    model = model_cls(config)
    with torch.no_grad():  # random init is near-uniform; logits as large as the trained demo's (~10)
        for p in model.parameters():
            p.mul_(4 if p.dim() > 1 else 1)
        model.lm_head.weight.mul_(5)
    model.save_pretrained(path)
    for name, data in files.items():
        (path / name).write_text(json.dumps(data))
    return path


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def load_hf(path: Path, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32).eval()


def prompt_ids(text: str) -> list[int]:
    return [VOCAB.index("<s>")] + encode(text)


@pytest.mark.slow
@pytest.mark.parametrize("type_name", list(READ_BACK_TOL))
def test_transformers_reads_the_gguf_back(tmp_path, seed, type_name):
    model_dir = demo_like(tmp_path / "m", seed, num_key_value_heads=2)  # GQA: K is permuted with its own heads
    export(model_dir, tmp_path / "out", type_name)
    ref, back = load_hf(model_dir), load_hf(tmp_path / "out", "model.gguf")
    diff = max(np.abs(hf_logits(ref, prompt_ids(p)) - hf_logits(back, prompt_ids(p))).max() for p in PROMPTS)
    print(f"{type_name}: max |logit diff| transformers GGUF vs safetensors = {diff:.3g}")
    assert diff <= READ_BACK_TOL[type_name]


@pytest.mark.slow
def test_tied_embeddings_leave_out_the_output_head(tmp_path, seed):
    from gguf import GGUFReader

    model_dir = demo_like(tmp_path / "m", seed, tie_word_embeddings=True)
    export(model_dir, tmp_path / "out", "f32")
    names = {t.name for t in GGUFReader(tmp_path / "out" / "model.gguf").tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    ref, back = load_hf(model_dir), load_hf(tmp_path / "out", "model.gguf")
    assert np.abs(hf_logits(ref, prompt_ids("12+34=")) - hf_logits(back, prompt_ids("12+34="))).max() <= 1e-5


def llama_cpp_model(path: Path):
    llama_cpp = required("llama_cpp", "llama-cpp-python is not installed (pip install -e '.[llama]')")
    return llama_cpp.Llama(model_path=str(path), n_ctx=SHAPE["max_position_embeddings"], logits_all=True,
                           n_threads=1, verbose=False)


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def cpp_greedy(llm, ids: list[int], steps: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if out[-1] == VOCAB.index("</s>"):
            break
        llm.eval(out[-1:])
    return out


def assert_same_greedy(model, ids: list[int], got: list[int], tol: float) -> None:
    """transformers' greedy continuation equals `got`, except that where transformers' two best
    logits are within `tol` of each other (a tie at the runtime's precision) either may come first:
    the comparison stops there."""
    steps = model.generate(torch.tensor([ids]), max_new_tokens=len(got), do_sample=False, pad_token_id=0,
                           eos_token_id=VOCAB.index("</s>"), output_scores=True, return_dict_in_generate=True)
    want = steps.sequences[0, len(ids):].tolist()
    for k, (w, g) in enumerate(zip(want, got)):
        if w != g:
            top2 = torch.topk(steps.scores[k][0], 2).values
            assert top2[0] - top2[1] <= tol, f"greedy step {k}: llama.cpp {g}, transformers {w}"
            return
    assert len(want) == len(got), (want, got)


@pytest.mark.slow
@pytest.mark.parametrize("type_name", list(RUNTIME_TOL))
def test_llama_cpp_runs_the_gguf_like_transformers(tmp_path, seed, type_name):
    model_dir = demo_like(tmp_path / "m", seed, num_key_value_heads=2)
    export(model_dir, tmp_path / "out", type_name)
    llm = llama_cpp_model(tmp_path / "out" / "model.gguf")
    ref, back = load_hf(model_dir), load_hf(tmp_path / "out", "model.gguf")
    runtime = total = 0.0
    for p in PROMPTS:
        ids = prompt_ids(p)
        got = cpp_logits(llm, ids)
        runtime = max(runtime, np.abs(got - hf_logits(back, ids)).max())
        total = max(total, np.abs(got - hf_logits(ref, ids)).max())
        assert_same_greedy(ref, ids, cpp_greedy(llm, ids, 8), READ_BACK_TOL[type_name] + RUNTIME_TOL[type_name])
    print(f"{type_name}: max |logit diff| llama.cpp vs transformers: same GGUF weights {runtime:.3g}, "
          f"safetensors {total:.3g}")
    assert runtime <= RUNTIME_TOL[type_name]
    assert total <= READ_BACK_TOL[type_name] + RUNTIME_TOL[type_name]


@pytest.mark.slow
def test_mistral_exports_like_llama(tmp_path, seed):
    model_dir = demo_like(tmp_path / "m", seed, arch="mistral", num_key_value_heads=2, sliding_window=None)
    export(model_dir, tmp_path / "out", "f32")
    llm = llama_cpp_model(tmp_path / "out" / "model.gguf")
    ref = load_hf(model_dir)
    for p in PROMPTS:
        assert np.abs(cpp_logits(llm, prompt_ids(p)) - hf_logits(ref, prompt_ids(p))).max() <= RUNTIME_TOL["f32"]


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_transformers(tmp_path, seed):
    from transformers import AutoTokenizer

    model_dir = demo_like(tmp_path / "m", seed)
    export(model_dir, tmp_path / "out", "f16")
    llm = llama_cpp_model(tmp_path / "out" / "model.gguf")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # the last two hold characters outside the vocabulary: both tokenizers drop them
    for text in PROMPTS + ["  two  spaces ", "x", "UPPER and é\n", ""]:
        want = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == want, text
        assert llm.detokenize(want[1:]).decode() == tokenizer.decode(want[1:]), text


def byte_level_tokenizer(split_regex: str | None) -> dict:
    """A small byte-level BPE trained here (no download): GPT-2's own split when `split_regex` is
    None, else that regex before a regex-less ByteLevel step (Llama 3, Qwen2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_regex is None)
    tok.pre_tokenizer = byte_level if split_regex is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split_regex), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    corpus = [f"add:{a}+{b}={a + b}. Hello world, it's 2026; I've 12345 ideas!\n" for a in range(30) for b in range(7)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=VOCAB[:3],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return json.loads(tok.to_str())


@pytest.mark.slow
@pytest.mark.parametrize("split", ["gpt-2", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_byte_level_bpe_like_transformers(tmp_path, seed, split):
    from transformers import AutoTokenizer

    from stages.export.tokenizer_meta import _SPLIT_REGEXES

    regex = {name: r for r, name in _SPLIT_REGEXES.items()}[split]
    model_dir = demo_like(tmp_path / "m", seed, tokenizer=byte_level_tokenizer(None if split == "gpt-2" else regex))
    export(model_dir, tmp_path / "out", "f16")
    llm = llama_cpp_model(tmp_path / "out" / "model.gguf")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for text in PROMPTS + ["Hello world, it's 2026; I've 12345 ideas!\n", "  two  spaces\n\n x", "héllo ünïcode 🙂"]:
        want = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == want, text
        assert llm.detokenize(want[1:]).decode() == tokenizer.decode(want[1:]), text


def test_modelfile_for_chatml_and_for_no_template(tmp_path, seed):
    model_dir = demo_like(tmp_path / "m", seed)
    export(model_dir, tmp_path / "plain", "f16")
    assert (tmp_path / "plain" / "Modelfile").read_text() == (
        'FROM ./model.gguf\n# no chat template: prompts reach the model as they are\nTEMPLATE """{{ .Prompt }}"""\n'
        'PARAMETER stop "</s>"\n')
    from mergekit_ops.files import CHAT_TEMPLATES  # what a recipe's `chat_template: chatml` writes

    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHAT_TEMPLATES["chatml"]}))
    assert export(model_dir, tmp_path / "chat", "f16") == []
    assert (tmp_path / "chat" / "Modelfile").read_text() == (
        "FROM ./model.gguf\n# TEMPLATE: the model's chatml chat template in Go template syntax\n"
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        '{{ end }}<|im_start|>assistant\n"""\nPARAMETER stop "<|im_end|>"\nPARAMETER stop "</s>"\n')
    from gguf import GGUFReader

    field = GGUFReader(tmp_path / "chat" / "model.gguf").fields["tokenizer.chat_template"]
    assert field.contents() == CHAT_TEMPLATES["chatml"]


def test_an_unknown_chat_template_is_left_out_and_said(tmp_path, seed):
    model_dir = demo_like(tmp_path / "m", seed)
    (model_dir / "chat_template.jinja").write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    warnings = export(model_dir, tmp_path / "out", "f16")
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert len(warnings) == 1 and "not one this exporter translates" in warnings[0]
    assert "\nTEMPLATE" not in text and "# TEMPLATE left out" in text


def test_lmstudio_layout_and_unrelated_files_kept(tmp_path, seed):
    model_dir = demo_like(tmp_path / "m", seed)
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "keep.txt").write_text("mine")
    export(model_dir, out, "q8_0", name="demo-merge", publisher="me")
    lm = out / "lmstudio" / "me" / "demo-merge" / "demo-merge-Q8_0.gguf"
    assert lm.read_bytes() == (out / "model.gguf").read_bytes()
    assert (out / "notes" / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out*"))  # no staging folder left
    with pytest.raises(ExportError, match="single folder name"):
        export(model_dir, out, "f16", publisher="a/b")


def test_same_input_same_bytes(tmp_path, seed):
    model_dir = demo_like(tmp_path / "m", seed)
    export(model_dir, tmp_path / "a", "q8_0")
    export(model_dir, tmp_path / "b", "q8_0")
    assert tree_digests(tmp_path / "a") == tree_digests(tmp_path / "b")


def test_unknown_architecture_is_named(tmp_path, seed):
    model_dir = demo_like(tmp_path / "m", seed)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ExportError, match="'GPT2LMHeadModel'.*supported: LlamaForCausalLM, MistralForCausalLM"):
        export(model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_or_unusable_tokenizer_is_named(tmp_path, seed):
    model_dir = demo_like(tmp_path / "m", seed)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"tokenizer\.json: missing"):
        export(model_dir, tmp_path / "out")
    write_tokenizer(model_dir, list(VOCAB))  # the word-level tokenizer of tests/tiny.py
    with pytest.raises(ExportError, match=r"tokenizer\.json: tokenizer model 'WordLevel' is not supported"):
        export(model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.slow
def test_the_demo_merge_exported_by_dvc_repro_runs_in_llama_cpp_as_in_transformers():
    """The demo's GGUF export (conf/exports, built by `dvc repro`) of its published merge: llama.cpp's
    greedy answers to the demo's test prompts are transformers' on the safetensors merge, and the
    logits agree within F16's bounds."""
    import yaml

    from stages.common.layout import export_dir, model_dir

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    name, spec = next((n, e) for n, e in params["exports"].items() if e["kind"] == "gguf")
    gguf = ROOT / export_dir(name, params) / "model.gguf"
    if not gguf.is_file() and os.environ.get("MERGEFORGE_REQUIRE_ALL") != "1":
        pytest.skip(f"{gguf} is not built: run `dvc repro` first")
    llm = llama_cpp_model(gguf)
    merge = load_hf(ROOT / model_dir(spec["model"], params))
    tol = READ_BACK_TOL[spec["type"]] + RUNTIME_TOL[spec["type"]]
    worst = 0.0
    for skill in ("add", "get", "rev"):
        lines = (ROOT / f"artifacts/demo/eval/{skill}.test.jsonl").read_text().splitlines()[:10]
        for case in map(json.loads, lines):
            ids = prompt_ids(case["prompt"])
            worst = max(worst, np.abs(cpp_logits(llm, ids) - hf_logits(merge, ids)).max())
            assert_same_greedy(merge, ids, cpp_greedy(llm, ids, 8), tol)
    print(f"demo {name} ({spec['type']}): max |logit diff| llama.cpp vs transformers = {worst:.3g}")
    assert worst <= tol
