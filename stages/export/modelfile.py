"""An Ollama Modelfile for the exported GGUF: FROM, a Go TEMPLATE for the model's chat format, stops.

Ollama renders prompts with Go templates, not Jinja, so a model's Jinja chat template cannot be
passed through: the common formats are recognised by the markers that define them and written as
the equivalent Go template. An unrecognised template is left out (said in the file and returned as
a warning) rather than guessed: a wrong template degrades every answer without an error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .tokenizer_meta import GgufVocab

TEMPLATE_DOCS = "https://github.com/ollama/ollama/blob/main/docs/template.md"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    markers: tuple[str, ...]  # all present in the Jinja template: this format
    template: str  # Ollama Go template
    end_of_turn: tuple[str, ...]  # stop strings besides the end-of-sequence token


# Most specific first: a llama-2 template also matches the bare [INST] markers.
FORMATS = (
    ChatFormat("chatml", ("<|im_start|>", "<|im_end|>"),
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
               "{{ end }}<|im_start|>assistant\n", ("<|im_end|>",)),
    ChatFormat("llama-3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>",)),
    ChatFormat("llama-2", ("[INST]", "[/INST]", "<<SYS>>"),
               "[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST]", ()),
    ChatFormat("mistral", ("[INST]", "[/INST]"),
               "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]", ()),
    ChatFormat("alpaca", ("### Instruction:", "### Response:"),
               "{{ if .System }}{{ .System }}\n\n{{ end }}### Instruction:\n{{ .Prompt }}\n\n### Response:\n",
               ("### Instruction:",)),
)


def recognise(chat_template: str) -> ChatFormat | None:
    return next((f for f in FORMATS if all(m in chat_template for m in f.markers)), None)


def render(vocab: GgufVocab, gguf_name: str = "model.gguf") -> tuple[str, list[str]]:
    """The Modelfile's text and the warnings to show (an unrecognised chat template)."""
    lines, warnings, stops = [f"FROM ./{gguf_name}"], [], []
    if vocab.chat_template is None:
        lines += ["# no chat template: prompts reach the model as they are", 'TEMPLATE """{{ .Prompt }}"""']
    elif (fmt := recognise(vocab.chat_template)) is None:
        warnings.append("the model's chat template is not one this exporter translates to Ollama's Go template "
                        f"({', '.join(f.name for f in FORMATS)}): the Modelfile has no TEMPLATE; write one by hand "
                        f"({TEMPLATE_DOCS})")
        lines.append(f"# TEMPLATE left out: {warnings[-1]}")
    else:
        lines += [f"# TEMPLATE: the model's {fmt.name} chat template in Go template syntax",
                  f'TEMPLATE """{fmt.template}"""']
        stops += fmt.end_of_turn
    if vocab.eos_text:
        stops.append(vocab.eos_text)
    # json.dumps quotes and escapes a token the way Ollama's parser unquotes it
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n", warnings
