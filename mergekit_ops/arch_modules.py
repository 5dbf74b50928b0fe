"""Modules of multimodal architectures (mergekit's `modules:`): which tensors each one holds.

A recipe with `modules:` merges each module on its own (its models or slices, its parameters
between a slice's and the recipe's). mergekit 0.1.5 names the modules of these architectures
(from its architecture definitions; the tensor names are the checkpoints'): every other
architecture is one module, `default`, that holds every tensor. A module's tensors are those
whose name starts with one of its prefixes; a module a recipe leaves out is not in the output, as
in mergekit. Layer counts: the config key mergekit reads for the module's layers (dotted path).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Module:
    prefixes: tuple[str, ...]
    layers_key: str | None  # the config key of the module's layer count (dotted), None if it has no stack


_QWEN2_VL = {"text_decoder": Module(("model.", "lm_head."), "num_hidden_layers"),
             "multi_modal_projector": Module(("visual.merger.",), None),
             "vision_tower": Module(("visual.blocks.", "visual.patch_embed."), "vision_config.depth")}
_QWEN3_VL = {"text_decoder": Module(("model.language_model.", "lm_head."), "text_config.num_hidden_layers"),
             "multi_modal_projector": Module(("model.visual.merger.", "model.visual.deepstack_merger_list."), None),
             "vision_tower": Module(("model.visual.blocks.", "model.visual.patch_embed.", "model.visual.pos_embed."),
                                    "vision_config.depth")}
_LANGUAGE_MODEL = Module(("language_model.",), "text_config.num_hidden_layers")
ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": _QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": {**_QWEN2_VL, "text_decoder": Module(("model.", "lm_head."),
                                                                                "text_config.num_hidden_layers")},
    "Qwen3VLForConditionalGeneration": _QWEN3_VL,
    "Qwen3VLMoeForConditionalGeneration": _QWEN3_VL,
    "Mistral3ForConditionalGeneration": {"text_decoder": _LANGUAGE_MODEL,
                                         "multi_modal_projector": Module(("multi_modal_projector.",), None),
                                         "vision_tower": Module(("vision_tower.",), "vision_config.num_hidden_layers")},
    "Gemma3ForConditionalGeneration": {"text_decoder": _LANGUAGE_MODEL,
                                       "multi_modal_projector": Module(("multi_modal_projector.",), None),
                                       "vision_tower": Module(("vision_tower.vision_model.",),
                                                              "vision_config.num_hidden_layers")},
    "Llama4ForConditionalGeneration": {"text_decoder": _LANGUAGE_MODEL,
                                       "multi_modal_projector": Module(("multi_modal_projector.",), None),
                                       "vision_model": Module(("vision_model.",), "vision_config.num_hidden_layers")},
    "T5ForConditionalGeneration": {"encoder": Module(("encoder.",), "num_layers"),
                                   "decoder": Module(("decoder.",), "num_decoder_layers"),
                                   "shared": Module(("shared.", "lm_head."), None)},
    "WhisperForConditionalGeneration": {"encoder": Module(("model.encoder.",), "encoder_layers"),
                                        "decoder": Module(("model.decoder.", "proj_out."), "decoder_layers")},
}
DEFAULT = {"default": Module(("",), None)}  # every other architecture: one module, every tensor


def modules_of(config: dict) -> dict[str, Module]:
    """The modules of a checkpoint's architecture (config.json `architectures`), by name."""
    return ARCHITECTURES.get((config.get("architectures") or [None])[0], DEFAULT)


def owner(modules: dict[str, Module], tensor: str) -> str | None:
    """The module whose longest prefix starts the tensor's name (None: no module holds it)."""
    best = max(((len(p), name) for name, m in modules.items() for p in m.prefixes if tensor.startswith(p)),
               default=None)
    return best[1] if best else None
