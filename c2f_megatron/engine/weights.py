"""Initial weights of a model built for a role: which checkpoint parts load into which chunks.

A ``gpt`` model loads a ``gpt`` checkpoint whole. A ``value`` model (reward model, critic) loads a
``value`` checkpoint whole, or the backbone of a ``gpt`` checkpoint (an LM, e.g. the converted base model):
everything but its vocabulary projection, the scalar head keeping its initialisation. dist_checkpointing
reshards on load, so the chunks may be at any TP/PP.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from c2f_megatron.checkpoint import METADATA_FILE
from c2f_megatron.checkpoint.megatron_dir import (
    MODEL_SUBDIR,
    CheckpointError,
    CheckpointMetadata,
    load_dist_state,
    load_model_checkpoint,
    read_metadata,
    sharded_model_state,
    unwrap_model,
)


def load_weights(kind: str, chunks: Sequence[torch.nn.Module], ckpt: str | Path) -> CheckpointMetadata:
    """Load ``ckpt`` into this rank's ``kind`` chunks; returns the checkpoint's metadata."""
    meta = read_metadata(ckpt)
    if kind == "gpt" and meta.kind != "gpt":
        raise CheckpointError(
            f"{Path(ckpt) / METADATA_FILE}: field 'kind' is {meta.kind!r}; a language model needs a 'gpt' checkpoint"
        )
    if meta.kind not in ("gpt", "value"):
        raise CheckpointError(
            f"{Path(ckpt) / METADATA_FILE}: field 'kind' is {meta.kind!r}, expected 'gpt' or 'value'"
        )
    if kind == meta.kind:
        return load_model_checkpoint(chunks, ckpt)
    return _load_backbone(chunks, ckpt, meta)


def _load_backbone(chunks: Sequence[torch.nn.Module], ckpt: str | Path, meta: CheckpointMetadata):
    """A value model from an LM checkpoint: every tensor but the vocabulary projection."""
    state = sharded_model_state(chunks)
    for i, _ in enumerate(chunks):
        sub = state if len(chunks) == 1 else state[f"model{i}"]
        for key in [k for k in sub if k.startswith("output_layer.")]:
            sub.pop(key)
    loaded = load_dist_state(state, Path(ckpt) / MODEL_SUBDIR)
    for i, chunk in enumerate(chunks):
        sub = loaded if len(chunks) == 1 else loaded[f"model{i}"]
        result = unwrap_model(chunk).load_state_dict(sub, strict=False)
        missing = [
            k
            for k in result.missing_keys
            if not k.startswith("output_layer.") and not k.endswith("_extra_state")
        ]
        if missing:
            raise CheckpointError(f"{ckpt}: backbone weights missing from the checkpoint: {missing[:8]}")
    return meta
