"""export stage: one conf/exports/NAME.yaml into artifacts/exports/NAME, from a built merge.

    python -m stages.export NAME

kind gguf: model.gguf, its Ollama Modelfile and LM Studio's layout (gguf_export.py). kind lora: a
PEFT adapter of rank `rank` over `base`, with extraction.json giving each module's error against
the merge (mergekit_ops' extract_lora).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from mergekit_ops import MergeError

from ..common import tracking
from ..common.errors import LineageError
from ..common.layout import export_dir, model_dir
from ..common.stage_cli import in_section, run_stage
from .errors import ExportError


def build(name: str, params: dict, progress: bool = False) -> Path:
    spec = params["exports"][name]
    out = export_dir(name, params)
    source = model_dir(spec["model"], params)
    if spec["kind"] == "gguf":
        from .gguf_export import export

        export(source, out, spec["type"], spec["model"], spec["publisher"], progress=progress)
        return out
    from mergekit_ops import ExtractOptions, extract_lora, progress_bar

    base = model_dir(spec["base"], params)
    hub_id = params["models"].get(spec["base"], {}).get("repo_id")  # what the adapter names as its base
    with progress_bar(progress) as bar:
        options = ExtractOptions(rank=spec["rank"], embeddings=spec["embeddings"], norms=spec["norms"], progress=bar,
                                 base_name=hub_id or str(base))
        extract_lora(str(source), str(base), out, options)
    return out


def build_and_record(name: str, params: dict, progress: bool = False) -> Path:
    """build(), then the export's MLflow run; a build that cannot be recorded is removed, so DVC
    never caches an export the lineage lacks (as the merge stage does)."""
    tracking.connect()  # a store that cannot be used fails before the work
    out = build(name, params, progress)
    try:
        tracking.record_export(name, params)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    def action(name: str, params: dict) -> str:
        return f"exported {name} into {build_and_record(name, params, sys.stderr.isatty())}"

    return run_stage(argv, "stages.export", "export", in_section("exports"), action,
                     (ExportError, MergeError, LineageError))
