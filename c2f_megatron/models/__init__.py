"""Model architectures: ``ModelConfig`` and the presets (Mistral, Llama-3, SmolLM2) translated to megatron's
``TransformerConfig``, the run-time layer spec (TE / torch SDPA / local), the ``GPTModel`` builder and the
scalar value head. No checkpoint I/O here (that is ``checkpoint`` and ``engine.weights``)."""

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
