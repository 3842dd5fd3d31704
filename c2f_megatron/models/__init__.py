"""Mistral model presets, layer specs and the megatron GPTModel builder."""

from c2f_megatron.models.config import PRESETS, ModelConfig, get_preset, to_transformer_config
from c2f_megatron.models.gpt import build_gpt_model, build_model_chunks, mask_padded_vocab, position_ids_for
from c2f_megatron.models.specs import get_layer_spec, resolve_layer_spec

__all__ = [
    "PRESETS",
    "ModelConfig",
    "build_gpt_model",
    "build_model_chunks",
    "get_layer_spec",
    "get_preset",
    "mask_padded_vocab",
    "position_ids_for",
    "resolve_layer_spec",
    "to_transformer_config",
]
