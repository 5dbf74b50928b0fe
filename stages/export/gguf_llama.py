"""A Llama-family safetensors folder as one GGUF file that llama.cpp (and so Ollama, LM Studio) runs.

What the `gguf` package leaves to a converter, done here (docs/export.md has the facts and checks):
tensor names mapped with gguf.TensorNameMap, Q/K rows permuted for llama.cpp's RoPE, the
hyperparameter keys llama.cpp reads, 1-D tensors kept in F32, a tied output head left out (llama.cpp
then reuses token_embd), and the tokenizer metadata. Tensors are streamed one at a time: peak memory
is one tensor, not the model. The same input gives the same bytes (no timestamps, a fixed order).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES, GGUFValueType, LlamaFileType

from . import GGUF_TYPES
from .errors import ExportError
from .tokenizer_meta import GgufVocab, read_vocab

# HF architectures whose checkpoints are llama.cpp's LLAMA layout (Mistral: the same tensors, and
# llama.cpp's converter files it under LLAMA too); each one is exercised by tests/test_export_gguf.py
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
TYPES = dict(zip(GGUF_TYPES, (Q.F32, Q.F16, Q.BF16, Q.Q8_0)))
FILE_TYPES = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
              Q.Q8_0: LlamaFileType.MOSTLY_Q8_0}
# buffers some older checkpoints carry: recomputed by every runtime, never weights
SKIPPED = ("rotary_emb.inv_freq",)


@dataclass
class Hyper:
    """The config.json numbers llama.cpp needs, checked."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    tied: bool


@dataclass
class Written:
    """What write_gguf wrote: the tokenizer (the Modelfile needs it too) and the tensors stored in
    another type than asked, with why."""

    vocab: GgufVocab
    fallbacks: dict[str, str] = field(default_factory=dict)


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can write a zero-length array. The GGUF format allows one and llama.cpp reads
    it, but gguf-py refuses; llama.cpp requires tokenizer.ggml.merges for a BPE tokenizer, and a
    character-level BPE has no merges."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == GGUFValueType.ARRAY and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def check_architecture(config: dict, config_path: Path) -> str:
    arch = (config.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise ExportError(f"{config_path}: architecture '{arch}' cannot be exported to GGUF by this exporter "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    return arch


def read_hyper(config: dict, config_path: Path) -> Hyper:
    def need(key: str):
        if key not in config:
            raise ExportError(f"{config_path}: '{key}' is missing")
        return config[key]

    if config.get("hidden_act", "silu") != "silu":
        raise ExportError(f"{config_path}: hidden_act '{config['hidden_act']}' (llama.cpp's Llama uses silu)")
    # transformers 5 writes rope_parameters; older configs rope_theta and rope_scaling
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise ExportError(f"{config_path}: RoPE scaling '{rope_type}' is not supported by this exporter (default only)")
    window = config.get("sliding_window")
    n_ctx = need("max_position_embeddings")
    if window is not None and window < n_ctx:  # llama.cpp's LLAMA attends to the whole context
        raise ExportError(f"{config_path}: sliding_window {window} < max_position_embeddings {n_ctx}: llama.cpp's "
                          "Llama graph has no sliding window, so long prompts would give other answers")
    n_head = need("num_attention_heads")
    head_dim = config.get("head_dim") or need("hidden_size") // n_head
    if head_dim % 2:
        raise ExportError(f"{config_path}: head_dim {head_dim} is odd; RoPE rotates pairs of dimensions")
    return Hyper(n_layer=need("num_hidden_layers"), n_embd=need("hidden_size"), n_ff=need("intermediate_size"),
                 n_head=n_head, n_head_kv=config.get("num_key_value_heads") or n_head, head_dim=head_dim, n_ctx=n_ctx,
                 rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                 rms_eps=float(config.get("rms_norm_eps", 1e-6)), tied=bool(config.get("tie_word_embeddings", False)))


def rope_interleave(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Q or K projection rows reordered for llama.cpp's RoPE. transformers rotates each head's dims i
    and i + d/2 together (rotate_half); llama.cpp's LLAMA rope rotates adjacent dims 2i and 2i + 1.
    So within each head, row i of the first half goes to 2i and row i of the second half to 2i + 1."""
    head = rows.shape[0] // n_head
    return rows.reshape(n_head, 2, head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _order(name: str) -> tuple:
    """Layers in numeric order (layer 10 after 9), the rest by name: one fixed order, readable dumps."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def _tensor_type(shape: tuple[int, ...], wanted: Q) -> tuple[Q, str | None]:
    """llama.cpp's own rules: 1-D tensors (norms, biases) stay F32; a row that is not a whole number
    of quantization blocks is stored F16."""
    if len(shape) == 1:
        return Q.F32, None
    block = GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return Q.F16, f"row length {shape[-1]} is not a multiple of {wanted.name}'s block of {block}"
    return wanted, None


def _encode(data: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)  # BF16, Q8_0: gguf's numpy quantizers, as llama.cpp's converter


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _add_hyper(writer: gguf.GGUFWriter, hp: Hyper, n_vocab: int, qtype: Q) -> None:
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.n_embd // hp.n_head:  # llama.cpp assumes n_embd / n_head unless told
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_file_type(FILE_TYPES[qtype])


def _add_vocab(writer: gguf.GGUFWriter, vocab: GgufVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, vocab.merges, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    for token_id, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                          (vocab.pad, writer.add_pad_token_id), (vocab.unk, writer.add_unk_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def write_gguf(model_dir: Path, path: Path, qtype: Q, name: str, config: dict,
               progress: Callable[[int, int, int], None] | None = None) -> Written:
    """Write `path` from the safetensors model in `model_dir` (its parsed config.json: `config`)."""
    import torch
    from safetensors import safe_open

    from mergekit_ops import Checkpoint, CheckpointError

    config_path = model_dir / "config.json"
    check_architecture(config, config_path)
    hp = read_hyper(config, config_path)
    try:
        checkpoint = Checkpoint.open(str(model_dir.resolve()))
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    infos = {k: v for k, v in checkpoint.tensors.items() if not k.endswith(SKIPPED)}
    if hp.tied:
        infos.pop("lm_head.weight", None)  # the same matrix as the embedding: llama.cpp reuses token_embd
    elif "lm_head.weight" not in infos:
        raise ExportError(f"{model_dir}: no lm_head.weight, and config.json does not tie the embeddings")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp.n_layer)
    embed = infos.get("model.embed_tokens.weight")
    if embed is None:
        raise ExportError(f"{model_dir}: no model.embed_tokens.weight")
    n_vocab = embed.shape[0]
    vocab = read_vocab(model_dir, n_vocab, config)

    plan, written = [], Written(vocab)
    for hf_name in sorted(infos, key=_order):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"{model_dir}: tensor '{hf_name}' has no llama.cpp name in the Llama layout")
        shape = tuple(infos[hf_name].shape)
        tensor_type, why = _tensor_type(shape, qtype)
        if why:
            written.fallbacks[gguf_name] = f"{tensor_type.name}: {why}"
        heads = (hp.n_head if ".q_proj." in hf_name else hp.n_head_kv if ".k_proj." in hf_name else None)
        if heads is not None and shape[0] != heads * hp.head_dim:
            raise ExportError(f"{model_dir}: {hf_name} has {shape[0]} rows, not {heads} heads x {hp.head_dim}")
        plan.append((hf_name, gguf_name, shape, tensor_type, heads))

    writer = _Writer(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    _add_hyper(writer, hp, n_vocab, qtype)
    _add_vocab(writer, vocab)
    for _, gguf_name, shape, tensor_type, _ in plan:
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, tensor_type), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    done_bytes = 0
    for i, (hf_name, _, _, tensor_type, heads) in enumerate(plan, 1):
        with safe_open(str(infos[hf_name].path), framework="pt") as f:
            data = f.get_tensor(hf_name).to(torch.float32).numpy()
        if heads is not None:
            data = rope_interleave(data, heads)
        encoded = _encode(np.ascontiguousarray(data), tensor_type)
        writer.write_tensor_data(encoded)
        done_bytes += encoded.nbytes
        if progress:
            progress(i, len(plan), done_bytes)
    writer.close()
    return written
