"""The c2f megatron checkpoint directory: a megatron-core distributed checkpoint plus what rebuilds it.

Layout (the converters, the merge tool and every trainer read and write this)::

    CKPT/
      c2f_checkpoint.json   model config, tokenizer info, model kind, dtype, provenance
      model/                megatron ``dist_checkpointing`` (torch_dist) of ``model.sharded_state_dict()``
      <other parts>/        trainers add e.g. ``optimizer/`` beside ``model/``

A distributed checkpoint stores global tensors with shard offsets, so ``model/`` written at any TP/PP loads
at any TP/PP. Writes are atomic: everything goes to ``CKPT.partial`` and is renamed to ``CKPT`` after every
rank finished and the JSON was written; a directory without ``c2f_checkpoint.json`` is never complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from c2f_megatron.checkpoint import METADATA_FILE, atomic_dir
from c2f_megatron.models.config import ModelConfig

MODEL_SUBDIR = "model"
FORMAT_NAME = "c2f-megatron"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and field named."""


@dataclasses.dataclass
class CheckpointMetadata:
    model: ModelConfig
    tokenizer: dict[str, Any] | None = None
    kind: str = "gpt"  # "gpt" (LM head) or "value" (scalar head: reward model / critic)
    dtype: str = "fp32"
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": self.model.to_dict(),
            "tokenizer": self.tokenizer,
            "kind": self.kind,
            "dtype": self.dtype,
            "provenance": self.provenance,
            "extra": self.extra,
        }


def read_metadata(ckpt_dir: str | Path) -> CheckpointMetadata:
    """Read and validate ``c2f_checkpoint.json``; errors name the file and the field."""
    path = Path(ckpt_dir) / METADATA_FILE
    if not path.is_file():
        if Path(ckpt_dir).is_dir():
            raise CheckpointError(f"{path}: missing; {ckpt_dir} is not a complete c2f megatron checkpoint")
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if data.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: field 'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: field 'format_version' is {data.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    model = data.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: field 'model' missing or not an object")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(model) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown field(s) model.{', model.'.join(unknown)}")
    try:
        model_cfg = ModelConfig(**model)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: field 'model': {exc}") from exc
    return CheckpointMetadata(
        model=model_cfg,
        tokenizer=data.get("tokenizer"),
        kind=data.get("kind", "gpt"),
        dtype=data.get("dtype", model_cfg.params_dtype),
        provenance=data.get("provenance", {}),
        extra=data.get("extra", {}),
    )


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prepare_output(out_dir: str | Path, force: bool = False) -> Path:
    """Refuse an existing output unless ``force``; return a fresh ``.partial`` directory (all ranks)."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: output already exists (pass --force to replace it)")
    tmp = atomic_dir.prepare_output(out, force=True) if _rank() == 0 else atomic_dir.partial_path(out)
    _barrier()
    return tmp


def commit_output(tmp: Path, out_dir: str | Path, metadata: CheckpointMetadata | None) -> Path:
    """Write metadata (rank 0) and atomically move ``tmp`` to ``out_dir`` once every rank is done."""
    out = Path(out_dir)
    _barrier()
    if _rank() == 0:
        if metadata is not None:
            meta_tmp = tmp / (METADATA_FILE + ".tmp")
            meta_tmp.write_text(json.dumps(metadata.to_json(), indent=2, sort_keys=True))
            os.replace(meta_tmp, tmp / METADATA_FILE)
        atomic_dir.commit_output(tmp, out)
    _barrier()
    return out


def sharded_model_state(model_chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """The sharded state dict of all this rank's model chunks (one key space across VPP chunks).

    Replica ids come from the data-parallel group of the model's own process groups, so a PPO role built
    on its own layout (``platform.role_layout``) saves and loads like a model on the global one.
    """
    if len(model_chunks) == 1:
        return _sharded_state(unwrap_model(model_chunks[0]))
    state: dict[str, Any] = {}
    for i, chunk in enumerate(model_chunks):
        state[f"model{i}"] = _sharded_state(unwrap_model(chunk))
    return state


def _sharded_state(model: torch.nn.Module) -> dict[str, Any]:
    dp_cp = getattr(getattr(model, "pg_collection", None), "dp_cp", None)
    return model.sharded_state_dict(metadata=None if dp_cp is None else {"dp_cp_group": dp_cp})


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The bare megatron model inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def save_dist_state(sharded_state: dict[str, Any], directory: Path) -> None:
    """Save a sharded state dict with megatron's default (torch_dist) strategy into an empty directory."""
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(sharded_state, str(directory))


def load_dist_state(sharded_state: dict[str, Any], directory: Path) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    if not (directory / "metadata.json").is_file():
        raise CheckpointError(f"{directory}: no megatron distributed checkpoint here (metadata.json missing)")
    return dist_checkpointing.load(sharded_state, str(directory))


def save_model_checkpoint(
    model_chunks: Sequence[torch.nn.Module],
    out_dir: str | Path,
    metadata: CheckpointMetadata,
    force: bool = False,
    extra_parts: Callable[[Path], None] | None = None,
) -> Path:
    """Save this rank's model shards (all ranks call it) as a complete c2f checkpoint at ``out_dir``.

    ``extra_parts(tmp_dir)`` may write more parts (optimizer, trainer state) before the commit.
    """
    tmp = prepare_output(out_dir, force=force)
    save_dist_state(sharded_model_state(model_chunks), tmp / MODEL_SUBDIR)
    if extra_parts is not None:
        extra_parts(tmp)
    return commit_output(tmp, out_dir, metadata)


def load_model_checkpoint(
    model_chunks: Sequence[torch.nn.Module], ckpt_dir: str | Path
) -> CheckpointMetadata:
    """Load ``CKPT/model`` into this rank's chunks at whatever TP/PP they were built with."""
    metadata = read_metadata(ckpt_dir)
    state = load_dist_state(sharded_model_state(model_chunks), Path(ckpt_dir) / MODEL_SUBDIR)
    if len(model_chunks) == 1:
        unwrap_model(model_chunks[0]).load_state_dict(state)
    else:
        for i, chunk in enumerate(model_chunks):
            unwrap_model(chunk).load_state_dict(state[f"model{i}"])
    return metadata
