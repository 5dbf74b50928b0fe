"""LoRA extraction: a fine-tuned (or merged) model as a PEFT LoRA adapter over its base.

    from mergekit_ops import ExtractOptions, extract_lora
    report = extract_lora("merged/", "base/", "adapter/", ExtractOptions(rank=16))

Each target weight's change, W_model - W_base, becomes B @ A by truncated SVD (low_rank.py); the
adapter folder holds adapter_model.safetensors and adapter_config.json as PEFT 0.21 writes them,
and extraction.json, the report: each module's relative error ||delta - B A|| / ||delta||.
Tensors are read one at a time; nothing of either model is held whole.

Choices, and why:
- lora_alpha = r, and alpha_pattern = rank_pattern, so PEFT's scale alpha / r is 1 everywhere:
  B @ A is the change itself, with no factor for a reader to remember.
- A module smaller than the rank (min(out, in) < r) gets its full rank through rank_pattern, not
  zero padding: padding stores bytes that hold nothing.
- Every module PEFT will wrap gets factors (zeros for an unchanged one): target_modules names
  modules by their last name, and PEFT reports a wrapped module without weights as missing.
- Embeddings (`embeddings`): "lora" gives the input embedding PEFT's lora_embedding_A/B (whose
  change is (B @ A)^T) and lm_head plain lora_A/B; "full" copies the changed ones whole
  (modules_to_save). Tied embeddings are refused: PEFT would change the input embedding only.
- Norms (`norms`): a changed module whose parameters are all 1-D (RMSNorm, LayerNorm) is copied
  whole: modules_to_save with its full name, which PEFT 0.21 loads.
- Anything else that changed (biases, say) is not in the adapter: a warning, and the report,
  say how many tensors and what share of the change's norm.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import CheckpointError, MergeError
from .low_rank import low_rank_factors, one_thread, relative_error
from .outdir import build_in_place, check_out_dir, clean_leftovers, temp_dir
from .safetensors_io import ShardPlan, ShardWriter, read_tensor

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REPORT = "extraction.json"
PREFIX = "base_model.model."  # PEFT's saved keys: the path from a PeftModel to the base model's modules
BLOCK_WEIGHT = re.compile(r"model\.layers\.\d+\.(?:.+\.)?(?P<leaf>[^.]+)\.weight")
INPUT_EMBEDDING, OUTPUT_EMBEDDING = "embed_tokens", "lm_head"
EMBEDDING_MODES = ("lora", "full")

log = logging.getLogger("mergekit_ops")


@dataclass
class ExtractOptions:
    """What to extract. rank: of every LoRA module (smaller modules get their full rank);
    target_modules: last names of the modules to factor (None: every 2-D weight of the blocks);
    embeddings: None, "lora" or "full" (see the module doc); norms: copy changed norms whole;
    dtype: of the factors (None: the weight's own; copies always keep it); base_name: the adapter's
    base_model_name_or_path (None: the base reference as given); progress: called as
    progress(modules done, modules, bytes written), as a mergekit_ops.progress_bar takes it."""

    rank: int = 16
    target_modules: Sequence[str] | None = None
    embeddings: str | None = None
    norms: bool = False
    dtype: torch.dtype | None = None
    base_name: str | None = None
    progress: Callable[[int, int, int], None] | None = None


@dataclass(frozen=True)
class Part:
    """One module of the adapter. kind: "linear" or "embedding" (LoRA factors of its weight, of
    rank `rank`) or "copy" (the model's tensors of the module, whole)."""

    module: str
    kind: str
    sources: tuple[str, ...]
    rank: int = 0

    def outputs(self, tuned: Checkpoint, factor_dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple]]:
        """(key, dtype, shape) of the adapter tensors this part writes, in write order."""
        infos = [tuned.tensors[name] for name in self.sources]
        if self.kind == "copy":
            return [(PREFIX + i.name, i.dtype, i.shape) for i in infos]
        (rows, cols), dtype = infos[0].shape, factor_dtype or infos[0].dtype
        if self.kind == "embedding":  # PEFT's Embedding: change = (B @ A)^T, A is (r x vocab)
            return [(f"{PREFIX}{self.module}.lora_embedding_A", dtype, (self.rank, rows)),
                    (f"{PREFIX}{self.module}.lora_embedding_B", dtype, (cols, self.rank))]
        return [(f"{PREFIX}{self.module}.lora_A.weight", dtype, (self.rank, cols)),
                (f"{PREFIX}{self.module}.lora_B.weight", dtype, (rows, self.rank))]


def extract_lora(model: str, base: str, out_dir: str | Path, options: ExtractOptions | None = None) -> dict:
    """Write the adapter of `model` over `base` (model references as Checkpoint.open takes them) to
    out_dir, built in a temporary sibling and renamed into place when complete; returns the report,
    which is also written as out_dir/extraction.json."""
    options = options or ExtractOptions()
    _check_options(options)
    tuned, origin = Checkpoint.open(model), Checkpoint.open(base)
    check_pair(tuned, origin)
    lora_parts = plan_lora(tuned, options)
    targeted = {name for part in lora_parts for name in part.sources}
    with one_thread():  # norms summed in one order: the report is part of the output
        changes = {name: _delta(tuned, origin, name).norm().item() for name in tuned.tensors if name not in targeted}
    copies = plan_copies(tuned, changes, options)
    parts = sorted(lora_parts + copies, key=lambda p: p.module)
    copied = {name for part in copies for name in part.sources}
    uncaptured = {name: norm for name, norm in changes.items() if norm and name not in copied}

    out_dir = Path(out_dir).absolute()
    check_out_dir(out_dir, {f"model '{model}'": tuned.path, f"base '{base}'": origin.path},
                  {"the working directory": Path.cwd()})
    clean_leftovers(out_dir)
    tmp = temp_dir(out_dir)
    writer = ShardWriter(tmp, [ShardPlan(ADAPTER_WEIGHTS, [out for part in parts
                                                           for out in part.outputs(tuned, options.dtype)])])

    def fill() -> dict:
        with one_thread():  # the report's norms too are part of the output: one summation order
            modules = _write_parts(parts, tuned, origin, writer, options)
        report = build_report(model, base, options, modules, changes, uncaptured)
        _write_json(tmp / ADAPTER_CONFIG, adapter_config(tuned, base, options, parts))
        _write_json(tmp / REPORT, report)
        return report

    report = build_in_place(out_dir, tmp, writer, writer.nbytes + 2**20, fill)  # config and report: < 1 MiB
    if uncaptured:
        log.warning("%d changed tensors are not in the adapter (%.1f%% of the change's norm): %s%s",
                    len(uncaptured), 100 * report["uncaptured"]["delta_norm_share"], ", ".join(sorted(uncaptured)[:5]),
                    ", ..." if len(uncaptured) > 5 else "")
    return report


def _check_options(options: ExtractOptions) -> None:
    if not isinstance(options.rank, int) or options.rank < 1:
        raise MergeError(f"rank {options.rank!r}: a LoRA rank is a whole number of at least 1")
    if options.embeddings not in (None, *EMBEDDING_MODES):
        raise MergeError(f"embeddings {options.embeddings!r}: choose one of {', '.join(EMBEDDING_MODES)} (or none)")
    if options.dtype is not None and not options.dtype.is_floating_point:
        raise MergeError(f"dtype {options.dtype}: LoRA factors need a floating-point dtype")


def check_pair(tuned: Checkpoint, origin: Checkpoint) -> None:
    """The model and its base hold the same tensors, with the same shapes: an adapter can only
    change what the base has."""
    for have, lack in ((tuned, origin), (origin, tuned)):
        extra = sorted(set(have.tensors) - set(lack.tensors))
        if extra:
            more = f", nor are {len(extra) - 1} more" if extra[1:] else ""
            raise CheckpointError(f"tensor '{extra[0]}' of '{have.ref}' ({have.tensors[extra[0]].path}) is not in "
                                  f"'{lack.ref}' ({lack.path}){more}")
    for name, info in sorted(tuned.tensors.items()):
        other = origin.tensors[name]
        if info.shape != other.shape:
            raise CheckpointError(f"tensor '{name}': shape {list(info.shape)} in model '{tuned.ref}' ({info.path}) "
                                  f"but {list(other.shape)} in base '{origin.ref}' ({other.path})")


def plan_lora(tuned: Checkpoint, options: ExtractOptions) -> list[Part]:
    """The modules to factor: every 2-D weight whose module's last name is a target (as PEFT
    matches target_modules), the embeddings too with embeddings="lora"."""
    weights = {name[:-len(".weight")]: info for name, info in tuned.tensors.items()
               if name.endswith(".weight") and len(info.shape) == 2}
    leaves = set(options.target_modules) if options.target_modules is not None else {
        m["leaf"] for name in weights if (m := BLOCK_WEIGHT.fullmatch(name + ".weight"))}
    if options.embeddings == "lora":
        leaves |= {INPUT_EMBEDDING, OUTPUT_EMBEDDING}
        _refuse_tied(tuned, "embeddings='lora'")
    parts = [Part(module, "embedding" if module.rsplit(".", 1)[-1] == INPUT_EMBEDDING else "linear",
                  (info.name,), min(options.rank, *info.shape))
             for module, info in sorted(weights.items()) if module.rsplit(".", 1)[-1] in leaves]
    found = {p.module.rsplit(".", 1)[-1] for p in parts}
    asked = set(options.target_modules or ())
    if options.embeddings == "lora":
        asked |= {INPUT_EMBEDDING, OUTPUT_EMBEDDING}
    unknown = sorted(asked - found)
    if unknown:
        raise CheckpointError(f"model '{tuned.ref}': target module '{unknown[0]}' names no 2-D weight (module names "
                              f"are matched by their last part, as PEFT does: q_proj, down_proj, ...)")
    if not parts:
        raise CheckpointError(f"model '{tuned.ref}': no 2-D weight under model.layers.N. to extract; "
                              "name the modules with target_modules")
    for part in parts:
        if not tuned.tensors[part.sources[0]].dtype.is_floating_point:
            raise CheckpointError(f"model '{tuned.ref}': tensor '{part.sources[0]}' is not floating point")
    return parts


def plan_copies(tuned: Checkpoint, changes: dict[str, float], options: ExtractOptions) -> list[Part]:
    """The changed modules that go into the adapter whole (modules_to_save): norms with `norms`,
    the embeddings with embeddings="full"."""
    modules: dict[str, list[str]] = {}
    for name in sorted(tuned.tensors):
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    wanted = []
    for module, names in modules.items():
        if not any(changes.get(n) for n in names):
            continue
        leaf = module.rsplit(".", 1)[-1]
        if options.norms and all(len(tuned.tensors[n].shape) == 1 for n in names):
            wanted.append(module)
        elif options.embeddings == "full" and leaf in (INPUT_EMBEDDING, OUTPUT_EMBEDDING):
            wanted.append(module)
    if options.embeddings == "full" and any(m.endswith(INPUT_EMBEDDING) for m in wanted):
        _refuse_tied(tuned, "embeddings='full'")
    for module in wanted:  # PEFT picks modules_to_save by a bare suffix match of the module name
        clash = next((m for m in modules if m != module and m.endswith(module)), None)
        if clash:
            raise CheckpointError(f"model '{tuned.ref}': cannot copy module '{module}': PEFT would also apply it "
                                  f"to '{clash}', whose name ends the same way")
    return [Part(m, "copy", tuple(modules[m])) for m in wanted]


def _refuse_tied(tuned: Checkpoint, what: str) -> None:
    if f"{OUTPUT_EMBEDDING}.weight" not in tuned.tensors:
        raise CheckpointError(f"model '{tuned.ref}': {what} needs an untied {OUTPUT_EMBEDDING}.weight: with tied "
                              "embeddings, a PEFT adapter changes the input embedding but not the output layer")


def _delta(tuned: Checkpoint, origin: Checkpoint, name: str) -> torch.Tensor:
    """W_model - W_base in float32 (a copy: both inputs are freed when it returns)."""
    return read_tensor(tuned.tensors[name]).float() - read_tensor(origin.tensors[name]).float()


def _write_parts(parts: list[Part], tuned: Checkpoint, origin: Checkpoint, writer: ShardWriter,
                 options: ExtractOptions) -> dict[str, dict]:
    """Write every part's tensors in layout order; the report entry of each factored module."""
    modules, written = {}, 0
    for done, part in enumerate(parts, 1):
        if part.kind == "copy":
            tensors = [read_tensor(tuned.tensors[name]) for name in part.sources]
        else:
            delta = _delta(tuned, origin, part.sources[0])
            if part.kind == "embedding":
                delta = delta.T
            b, a = low_rank_factors(delta, part.rank)
            dtype = options.dtype or tuned.tensors[part.sources[0]].dtype
            b, a = b.to(dtype), a.to(dtype)
            modules[part.module] = {"kind": part.kind, "rank": part.rank, "delta_norm": delta.norm().item(),
                                    "relative_error": relative_error(delta, b, a)}
            tensors = [a, b]
        for (key, _, _), tensor in zip(part.outputs(tuned, options.dtype), tensors):
            writer.write(key, tensor)
            written += tensor.numel() * tensor.element_size()
        writer.flush()  # the writer may read a tensor until the next flush: the part's tensors go now
        if options.progress:
            options.progress(done, len(parts), written)
    return modules


def adapter_config(tuned: Checkpoint, base: str, options: ExtractOptions, parts: list[Part]) -> dict:
    """adapter_config.json: what PEFT needs to rebuild the modules; its other keys take PEFT's defaults."""
    factored = [p for p in parts if p.kind != "copy"]
    smaller = {p.module: p.rank for p in factored if p.rank != options.rank}
    copies = sorted(p.module for p in parts if p.kind == "copy")
    causal = any(str(a).endswith("ForCausalLM") for a in tuned.config.get("architectures") or ())
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if causal else None,
        "base_model_name_or_path": options.base_name or base,
        "r": options.rank, "lora_alpha": options.rank, "rank_pattern": smaller, "alpha_pattern": smaller,
        "target_modules": sorted({p.module.rsplit(".", 1)[-1] for p in factored}),
        "modules_to_save": copies or None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "lora_dropout": 0.0, "inference_mode": True,
    }


def build_report(model: str, base: str, options: ExtractOptions, modules: dict[str, dict],
                 changes: dict[str, float], uncaptured: dict[str, float]) -> dict:
    """extraction.json: per module error and norm, the summary, and what the adapter leaves out.
    total_relative_error: of the whole change (all tensors), the parts left out counted whole."""
    errors = [m["relative_error"] for m in modules.values()]
    worst = max(modules, key=lambda m: modules[m]["relative_error"])
    total = math.fsum(m["delta_norm"] ** 2 for m in modules.values()) + math.fsum(v * v for v in changes.values())
    missed = math.fsum(v * v for v in uncaptured.values())
    lost = math.fsum((m["delta_norm"] * m["relative_error"]) ** 2 for m in modules.values()) + missed
    return {
        "model": model, "base": base, "rank": options.rank,
        "dtype": str(options.dtype).removeprefix("torch.") if options.dtype else "as the model",
        "summary": {"modules": len(modules), "mean_relative_error": math.fsum(errors) / len(errors),
                    "max_relative_error": modules[worst]["relative_error"], "max_error_module": worst,
                    "total_relative_error": math.sqrt(lost / total) if total else 0.0},
        "uncaptured": {"tensors": sorted(uncaptured), "count": len(uncaptured),
                       "delta_norm_share": math.sqrt(missed / total) if total else 0.0},
        "modules": modules,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

