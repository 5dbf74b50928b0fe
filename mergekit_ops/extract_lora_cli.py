"""CLI: mergekit-ops-extract-lora MODEL BASE OUT_DIR --rank 16 — a model's change over its base as a
PEFT LoRA adapter (the library: lora_extract.py; also `python -m mergekit_ops.extract_lora_cli`)."""
from __future__ import annotations

import argparse
import os
import sys

from .__main__ import guarded, keep_freed_memory, leave

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mergekit_ops.extract_lora_cli" if sys.argv[0].endswith(".py") else "mergekit-ops-extract-lora",
        description="Extract a PEFT LoRA adapter from a fine-tuned or merged model and its base: truncated SVD of "
                    "each target weight's change. Writes adapter_model.safetensors, adapter_config.json (scale 1: "
                    "lora_alpha = r) and extraction.json (the relative error of every module).")
    p.add_argument("model", metavar="MODEL",
                   help="the fine-tuned or merged model: a folder, or a hub id in the local cache")
    p.add_argument("base", metavar="BASE", help="the model it was made from")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="where the adapter goes: a new or empty folder, or an earlier output of mergekit_ops")
    p.add_argument("--rank", "-r", type=int, default=16,
                   help="LoRA rank (default 16); modules smaller than that get their full rank")
    p.add_argument("--target-modules", type=lambda text: [t for t in text.split(",") if t], metavar="NAMES",
                   help="comma-separated last names of the modules to factor (default: every 2-D weight of "
                        "model.layers.N: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj for Llama)")
    p.add_argument("--embeddings", choices=("lora", "full"),
                   help="capture embed_tokens and lm_head: as LoRA factors of the same rank, or whole copies "
                        "(modules_to_save); default: left out and reported")
    p.add_argument("--norms", action="store_true", help="copy changed norm weights whole (modules_to_save)")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the LoRA factors (default: each weight's own)")
    p.add_argument("--base-name", help="base_model_name_or_path for the adapter config, e.g. the base's hub id "
                                       "(default: BASE as given)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    return p


def summary_lines(report: dict) -> list[str]:
    """The report's summary as a person reads it."""
    s, left = report["summary"], report["uncaptured"]
    lines = [f"{s['modules']} modules at rank {report['rank']}: relative error mean {s['mean_relative_error']:.4f}, "
             f"max {s['max_relative_error']:.4f} ({s['max_error_module']})",
             f"error of the whole change: {s['total_relative_error']:.4f}"]
    if left["count"]:
        lines.append(f"not in the adapter: {left['count']} changed tensors, {left['delta_norm_share']:.1%} of the "
                     "change's norm (see --embeddings, --norms)")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the merge CLI: idle workers must not spin
    import torch

    from .lora_extract import REPORT, ExtractOptions, extract_lora
    from .progress import progress_bar

    with progress_bar(not args.quiet) as bar:
        options = ExtractOptions(rank=args.rank, target_modules=args.target_modules, embeddings=args.embeddings,
                                 norms=args.norms, dtype=getattr(torch, args.dtype) if args.dtype else None,
                                 base_name=args.base_name, progress=bar)
        code, report = guarded(lambda: extract_lora(args.model, args.base, args.out_dir, options), args.out_dir)
    if code == 0 and not args.quiet:
        print("\n".join(summary_lines(report)))
        print(f"adapter written to {args.out_dir} (report: {REPORT})", file=sys.stderr)
    return code


def cli() -> None:
    """The `mergekit-ops-extract-lora` command."""
    leave(main())


if __name__ == "__main__":
    cli()
