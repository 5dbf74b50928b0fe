"""A Hugging Face fast tokenizer (tokenizer.json + tokenizer_config.json) as llama.cpp's
tokenizer.ggml.* metadata, for the tokenizer kinds llama.cpp tokenizes exactly as transformers does.

Supported (docs/export.md says why these and how each was checked):
- a character-level BPE: a BPE model with no merges, not byte-level, no normalizer, no
  pre-tokenizer, no byte fallback (the demo's). Written as llama.cpp's "gpt2" (BPE) kind with an empty
  merges list: every character is looked up alone on both sides, and a character outside the
  vocabulary is dropped on both sides. The token texts are re-spelled in GPT-2's byte-to-unicode
  alphabet, because llama.cpp's BPE looks words up in that alphabet (a space as "Ġ").
- a byte-level BPE (GPT-2, Llama 3 or Qwen2 pre-tokenizer): tokens and merges already in that
  alphabet, written as they are, with the tokenizer.ggml.pre whose split regex is the same.
Anything else (WordLevel, WordPiece, Unigram, a SentencePiece-style BPE with merges, only a
tokenizer.model) is refused by name: a GGUF that tokenizes differently gives wrong answers quietly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import ExportError

# llama.cpp's token types (gguf.TokenType), spelled here so this module needs no gguf import
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# tokenizer.json split regexes llama.cpp implements, by the tokenizer.ggml.pre name that selects them
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    _GPT2_REGEX: "gpt-2",
}


@dataclass
class GgufVocab:
    """What the GGUF file says about the tokenizer; ids are None where the model has no such token."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos: int | None
    eos: int | None
    pad: int | None
    unk: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    eos_text: str | None  # the Modelfile's stop string
    model: str = "gpt2"  # llama.cpp's BPE kind: the only one this exporter writes (see above)


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies and llama.cpp spell them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _byte_spelled(text: str) -> str:
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in text.encode("utf-8"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return data


def _parts(node: dict | None, key: str) -> list[dict]:
    """A pre-tokenizer, post-processor or decoder as the flat list of its steps (Sequence unrolled)."""
    if not node:
        return []
    return [p for child in node.get(key, []) for p in _parts(child, key)] if node.get("type") == "Sequence" else [node]


def _pre_tokenizer_name(path: Path, tokenizer: dict) -> str:
    """The tokenizer.ggml.pre whose regex splits text as this byte-level tokenizer's pre-tokenizer does."""
    steps = _parts(tokenizer.get("pre_tokenizer"), "pretokenizers")
    kinds = [s.get("type") for s in steps]
    if steps[-1].get("add_prefix_space"):  # llama.cpp never adds a space before a BPE text
        raise ExportError(f"{path}: the ByteLevel pre-tokenizer adds a prefix space, which llama.cpp does not do")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_REGEXES and steps[0].get("behavior") == "Isolated":
            return _SPLIT_REGEXES[regex]
    raise ExportError(f"{path}: a byte-level BPE whose pre-tokenizer ({json.dumps(tokenizer.get('pre_tokenizer'))[:200]}) "
                      f"is not one llama.cpp reproduces here (known: GPT-2, Llama 3, Qwen2 splits)")


def _model_vocab(path: Path, tokenizer: dict) -> tuple[dict[str, int], list[str], str, bool]:
    """(vocab, merges, pre-tokenizer name, whether texts must be re-spelled byte-level), or a clear refusal."""
    model = tokenizer.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise ExportError(f"{path}: tokenizer model '{kind}' is not supported (llama.cpp takes a BPE tokenizer.json "
                          "from this exporter: character-level, or byte-level like GPT-2 / Llama 3 / Qwen2)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    byte_level = any(p.get("type") == "ByteLevel" for p in _parts(tokenizer.get("pre_tokenizer"), "pretokenizers"))
    if byte_level:
        return model["vocab"], merges, _pre_tokenizer_name(path, tokenizer), False
    unsupported = [what for what, present in (("merges", merges), ("a normalizer", tokenizer.get("normalizer")),
                                              ("a pre-tokenizer", tokenizer.get("pre_tokenizer")),
                                              ("byte_fallback", model.get("byte_fallback"))) if present]
    if unsupported:
        raise ExportError(f"{path}: a BPE that is not byte-level, with {', '.join(unsupported)}: llama.cpp has no "
                          "tokenizer kind that splits text the same way (supported: character-level BPE with none of "
                          "these, or a byte-level BPE)")
    # with no merges and nothing before the model, the pre-tokenizer cannot change a result: any will do
    return model["vocab"], merges, "default", True


def _token_text(value) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _adds(tokenizer: dict, token: str | None, first: bool) -> bool:
    """Whether the post-processor puts `token` at the start (first) or end of every single text."""
    for step in _parts(tokenizer.get("post_processor"), "processors"):
        if step.get("type") == "TemplateProcessing" and step.get("single") and token is not None:
            edge = step["single"][0 if first else -1]
            return edge.get("SpecialToken", {}).get("id") == token
    return False


def _chat_template(model_dir: Path, config: dict) -> str | None:
    """transformers 5 saves chat_template.jinja; older files (and mergekit) keep it in tokenizer_config.json."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is the chat template
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template or None


def read_vocab(model_dir: Path, n_vocab: int, model_config: dict) -> GgufVocab:
    """The tokenizer of `model_dir` as GGUF metadata, padded with unused tokens to the `n_vocab`
    rows of the embedding (llama.cpp requires one token per row)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        other = [n for n in ("tokenizer.model", "vocab.json") if (model_dir / n).is_file()]
        found = f" (found only {', '.join(other)}, which this exporter does not read)" if other else ""
        raise ExportError(f"{path}: missing{found}; the GGUF file must carry the tokenizer, and the exporter "
                          "reads it from a fast tokenizer's tokenizer.json")
    tokenizer = _read_json(path)
    config_path = model_dir / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    vocab, merges, pre, respell = _model_vocab(path, tokenizer)
    tokens: dict[int, tuple[str, int]] = {i: (_byte_spelled(t) if respell else t, NORMAL) for t, i in vocab.items()}
    for added in tokenizer.get("added_tokens") or []:
        # llama.cpp matches added tokens on raw text, never in the byte alphabet
        tokens[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if max(tokens) >= n_vocab:
        raise ExportError(f"{path}: token id {max(tokens)} does not fit the model's {n_vocab} embedding rows")
    texts = [tokens.get(i, (f"[PAD{i}]", UNUSED)) for i in range(n_vocab)]
    raw_ids = {**vocab, **{a["content"]: a["id"] for a in tokenizer.get("added_tokens") or []}}

    def special(name: str) -> tuple[str | None, int | None]:
        text = _token_text(config.get(f"{name}_token"))
        if text is not None and text in raw_ids:
            return text, raw_ids[text]
        fallback = model_config.get(f"{name}_token_id")
        fallback = fallback[0] if isinstance(fallback, list) else fallback
        return (texts[fallback][0], fallback) if isinstance(fallback, int) and fallback < n_vocab else (None, None)

    (bos_text, bos), (eos_text, eos), (_, pad), (_, unk) = (special(n) for n in ("bos", "eos", "pad", "unk"))
    add_bos = config.get("add_bos_token")
    add_eos = config.get("add_eos_token")
    return GgufVocab(
        pre=pre, tokens=[t for t, _ in texts], token_types=[k for _, k in texts], merges=merges,
        bos=bos, eos=eos, pad=pad, unk=unk,
        add_bos=_adds(tokenizer, bos_text, True) if add_bos is None else bool(add_bos),
        add_eos=_adds(tokenizer, eos_text, False) if add_eos is None else bool(add_eos),
        chat_template=_chat_template(model_dir, config), eos_text=eos_text)
