"""Model architectures: ``ModelConfig`` and the presets (Mistral, Llama-3, SmolLM2) translated to megatron's
``TransformerConfig``, the run-time layer spec (TE / torch SDPA / local), the ``GPTModel`` builder and the
scalar value head. No checkpoint I/O here (that is ``checkpoint`` and ``engine.weights``).

The names below load their module on first use (PEP 562), so that ``models.config`` alone (what the
converters need) imports neither torch nor megatron."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "PRESETS": "config",
    "ModelConfig": "config",
    "get_preset": "config",
    "to_transformer_config": "config",
    "build_gpt_model": "gpt",
    "build_model_chunks": "gpt",
    "mask_padded_vocab": "gpt",
    "position_ids_for": "gpt",
    "get_layer_spec": "specs",
    "resolve_layer_spec": "specs",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
