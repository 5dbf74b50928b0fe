"""The non-weight files of a merged model: config, generation config, tokenizer, chat template."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import RecipeError
from .plan import MergePlan, output_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja")
CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
               " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
}


def write_side_files(plan: MergePlan, out: Path, copy_tokenizer: bool = True) -> None:
    """Write config.json (rewritten for slices) and copy generation/tokenizer files from their donor."""
    (out / "config.json").write_text(json.dumps(output_config(plan), indent=2, sort_keys=True) + "\n")
    generation = plan.checkpoints[plan.reference].file("generation_config.json")
    if generation:
        shutil.copyfile(generation, out / "generation_config.json")
    if not copy_tokenizer:
        return
    donor = _tokenizer_donor(plan)
    for name in TOKENIZER_FILES:
        path = donor.file(name)
        if path:
            shutil.copyfile(path, out / name)
    if plan.vocab is not None and plan.vocab.tokenizer is not None:
        _write_merged_tokenizer(plan, out)
    if plan.recipe.chat_template:
        _set_chat_template(plan, out)


def side_files_bytes(plan: MergePlan, copy_tokenizer: bool = True) -> int:
    """About what write_side_files writes: the source files' sizes, with room for a rewritten
    config and a merged vocabulary's tokenizer."""
    ref = plan.checkpoints[plan.reference]
    files = [ref.file("generation_config.json"), ref.file("config.json")]
    if copy_tokenizer:
        files += [_tokenizer_donor(plan).file(name) for name in TOKENIZER_FILES]
    return 2 * sum(f.stat().st_size for f in files if f) + 2**16


def _tokenizer_donor(plan: MergePlan) -> Checkpoint:
    """The model whose tokenizer files the output starts from: the tokenizer source, else the reference."""
    return plan.checkpoints[plan.vocab.source if plan.vocab is not None else plan.reference]


def _write_merged_tokenizer(plan: MergePlan, out: Path) -> None:
    """A union (or stripped) vocabulary: the new tokenizer.json, and its added tokens in
    tokenizer_config.json's `added_tokens_decoder`, which transformers also reads."""
    vocab = plan.vocab
    (out / "tokenizer.json").write_text(json.dumps(vocab.tokenizer, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    path = out / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    decoder = {k: v for k, v in (config.get("added_tokens_decoder") or {}).items() if int(k) < vocab.tokens}
    decoder.update({str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in vocab.added})
    config.pop("added_tokens_decoder", None)
    if decoder:
        config["added_tokens_decoder"] = decoder
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _set_chat_template(plan: MergePlan, out: Path) -> None:
    value = plan.recipe.chat_template
    template = CHAT_TEMPLATES.get(value, value)
    if "{{" not in template and "{%" not in template:
        raise RecipeError(f"'{value}' is neither a Jinja template nor a known name ({', '.join(CHAT_TEMPLATES)})",
                          plan.recipe.source, "chat_template")
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
