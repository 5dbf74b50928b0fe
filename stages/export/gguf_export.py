"""Export a merged Llama-family safetensors model for local runtimes: a GGUF file (llama.cpp), an
Ollama Modelfile beside it, and the folder layout LM Studio lists (layout.py).

    mergeforge export MODEL_DIR OUT_DIR [--type f16|bf16|q8_0|f32] [--name NAME] [--publisher NAME]

(in a project, conf/exports/NAME.yaml of kind gguf runs it as the stage export-NAME: stage.py)

Everything is written to a folder beside OUT_DIR first and moved in when complete: an interrupted
export leaves OUT_DIR as it was. The same model and options give byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .errors import ExportError
from .gguf_llama import TYPES, check_architecture, write_gguf
from .layout import GGUF_NAME, MODELFILE_NAME, install, link_or_copy, lmstudio_path, staging_dir
from .modelfile import render


def export(model_dir: Path, out_dir: Path, type_name: str = "f16", name: str | None = None,
           publisher: str = "mergeforge", progress: bool = False) -> list[str]:
    """Write OUT_DIR's files (see layout.py) from MODEL_DIR; returns the warnings (printed too when `progress`)."""
    from mergekit_ops import progress_bar

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if type_name not in TYPES:
        raise ExportError(f"type '{type_name}' is not one of {', '.join(TYPES)}")
    name = name or model_dir.resolve().name
    lm_file = lmstudio_path(publisher, name, type_name)  # checks the names before any work
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{config_path}: missing; MODEL_DIR must be a transformers model folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    check_architecture(config, config_path)  # before the staging folder exists

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr)

    staged = staging_dir(out_dir)
    try:
        say(f"writing {GGUF_NAME} ({type_name}) from {model_dir}")
        with progress_bar(progress) as bar:
            written = write_gguf(model_dir, staged / GGUF_NAME, TYPES[type_name], name, config, progress=bar)
        text, warnings = render(written.vocab, GGUF_NAME)
        warnings = [f"{tensor} stored as {why}" for tensor, why in written.fallbacks.items()] + warnings
        (staged / MODELFILE_NAME).write_text(text, encoding="utf-8")
        link_or_copy(staged / GGUF_NAME, staged / lm_file)
        install(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    for warning in warnings:
        say(f"warning: {warning}")
    say(f"wrote {out_dir / GGUF_NAME}, {out_dir / MODELFILE_NAME} and {out_dir / lm_file}")
    return warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mergeforge export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a transformers safetensors model folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where model.gguf, Modelfile and lmstudio/ go")
    parser.add_argument("--type", choices=list(TYPES), default="f16", help="tensor type of the GGUF (default f16)")
    parser.add_argument("--name", help="model name (default: MODEL_DIR's folder name)")
    parser.add_argument("--publisher", default="mergeforge", help="LM Studio publisher folder (default mergeforge)")
    args = parser.parse_args(argv)
    try:
        export(Path(args.model_dir), Path(args.out_dir), args.type, args.name, args.publisher, progress=True)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
