"""Training checkpoints: c2f checkpoint directories plus optimizer, scheduler, RNG and data position.

Layout of one step (``CKPT_ROOT/step_0000100``)::

    c2f_checkpoint.json, model/     the converters' format (one model at the root), or one such
    <name>/...                      directory per model when a trainer saves several (PPO actor + critic)
    optimizer/                      megatron dist_checkpointing of ``optimizer.sharded_state_dict``
    rng/rank_00003.pt               every RNG of every rank (torch, CUDA, numpy, python, megatron tracker)
    trainer_state.json              step, consumed samples, scheduler state, trainer extras (written last)

    c2f_manifest.json               every file's size and CRC-32 (``checkpoint.manifest``), written last

A step is written to ``step_0000100.partial`` and renamed when every rank is done and its files are fsynced,
so a crash mid-save leaves the previous step as the latest. Resume (``resume_checkpoint``) takes the newest
step that verifies against its manifest; a step that does not is renamed ``step_0000100.unverified``, kept,
and reported with the reason.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from c2f_megatron.checkpoint import atomic_dir, manifest
from c2f_megatron.checkpoint.megatron_dir import (
    METADATA_FILE,
    MODEL_SUBDIR,
    CheckpointError,
    CheckpointMetadata,
    commit_output,
    load_dist_state,
    load_model_checkpoint,
    model_bytes,
    prepare_output,
    save_dist_state,
    sharded_model_state,
    verify_checkpoint,
)
from c2f_megatron.checkpoint.steps import (
    TRAINER_STATE_FILE,
    list_checkpoints,
    step_dir,
)
from c2f_megatron.files import write_atomic

logger = logging.getLogger(__name__)

OPTIMIZER_SUBDIR = "optimizer"
RNG_SUBDIR = "rng"


@dataclass
class ModelState:
    """One model a trainer checkpoints: its chunks, optimizer (or None) and c2f metadata.

    ``name`` is the subdirectory in a step directory ("" = the step directory itself, for single-model
    trainers, so a step directory is directly a c2f checkpoint the converters read).
    """

    chunks: Sequence[torch.nn.Module]
    metadata: CheckpointMetadata
    optimizer: Any = None
    name: str = ""


@dataclass
class TrainerState:
    """What the loop needs to continue exactly: step, data position, scheduler, free-form extras."""

    step: int = 0
    consumed_samples: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete steps and any stale ``.partial`` (rank 0 only)."""
    if _rank() != 0:
        return []
    found = list_checkpoints(root)
    removed = [path for _, path in found[: max(len(found) - keep_last, 0)]]
    newest = found[-1][0] if found else -1
    for child in Path(root).iterdir():
        match = re.match(r"^step_(\d{7,})\.partial$", child.name)
        if match and int(match.group(1)) <= newest:
            removed.append(child)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


UNVERIFIED_SUFFIX = ".unverified"


def resume_checkpoint(root: str | Path) -> Path | None:
    """The newest complete step under ``root`` that verifies against its manifest (``verify_checkpoint``:
    sizes and CRC-32, each rank checking a slice of the files), or None. All ranks call it.

    A newer step that fails is renamed ``step_N.unverified`` (never deleted, no longer listed, so neither
    resumed from, pruned nor overwritten) and the reason is logged; the search goes on with older steps.
    """
    for _, path in reversed(list_checkpoints(root)):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        if _rank() == 0:
            kept = _set_aside(path)
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            logger.warning(
                "resume: skipping %s: %s%s; kept as %s, trying the previous step",
                path.name,
                problems[0],
                more,
                kept,
            )
        _barrier()
    return None


def _set_aside(path: Path) -> Path:
    target = path.with_name(path.name + UNVERIFIED_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{UNVERIFIED_SUFFIX}.{n}")
    path.rename(target)
    return target


def _step_bytes(root: str | Path, models: Sequence[ModelState]) -> int:
    """About the bytes of one step: the previous step's (its manifest), else the models' parameters plus
    12 bytes per parameter of Adam state (fp32 moments and master weights) for each optimizer saved."""
    found = list_checkpoints(root)
    previous = manifest.manifest_total_bytes(found[-1][1]) if found else None
    if previous:
        return previous
    return sum(
        model_bytes(m.metadata) + (12 * m.metadata.model.num_parameters() if m.optimizer is not None else 0)
        for m in models
    )


def rng_state() -> dict[str, Any]:
    """Every RNG this rank draws from, including megatron's model-parallel tracker."""
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # plain types and tensors only, so that loading needs no pickle of arbitrary objects (weights_only)
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def optimizer_sharded_state(
    optimizer: Any, chunks: Sequence[torch.nn.Module], sharding_type: str, is_loading: bool
) -> dict[str, Any]:
    """The optimizer's sharded state dict built against the model's (params matched by identity)."""
    metadata = {"distrib_optim_sharding_type": sharding_type}
    model_state = sharded_model_state(chunks)
    return optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)


def _write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def save_training_checkpoint(
    root: str | Path,
    models: Sequence[ModelState],
    state: TrainerState,
    keep_last: int | None = None,
    sharding_type: str = "dp_reshardable",
) -> Path:
    """Save a complete step checkpoint (all ranks call it) and prune old ones; returns the step directory."""
    out = step_dir(root, state.step)
    names = [m.name for m in models]
    if len(set(names)) != len(names) or ("" in names and len(names) > 1):
        raise ValueError(f"model names must be unique, and '' only for a single model; got {names}")
    with atomic_dir.cleanup_on_failure(out, need_bytes=_step_bytes(root, models)):
        tmp = prepare_output(out, force=True)
        for m in models:
            base = tmp / m.name
            save_dist_state(sharded_model_state(m.chunks), base / MODEL_SUBDIR)
            if m.optimizer is not None:
                opt_state = optimizer_sharded_state(m.optimizer, m.chunks, sharding_type, is_loading=False)
                save_dist_state(opt_state, base / OPTIMIZER_SUBDIR)
            if _rank() == 0:
                _write_json_atomic(base / METADATA_FILE, m.metadata.to_json())
        if _rank() == 0:
            (tmp / RNG_SUBDIR).mkdir(exist_ok=True)
        _barrier()
        torch.save(rng_state(), tmp / RNG_SUBDIR / f"rank_{_rank():05d}.pt")
        _barrier()
        if _rank() == 0:
            payload = {
                "step": state.step,
                "consumed_samples": state.consumed_samples,
                "scheduler": state.scheduler,
                "extra": state.extra,
                "models": names,
                "world_size": _world(),
                "sharding_type": sharding_type,
            }
            _write_json_atomic(tmp / TRAINER_STATE_FILE, payload)
        commit_output(tmp, out, metadata=None)
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    _barrier()
    return out


def read_trainer_state(ckpt: str | Path) -> TrainerState:
    path = Path(ckpt) / TRAINER_STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing; {ckpt} is not a complete training checkpoint") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("step", "consumed_samples"):
        if not isinstance(data.get(key), int):
            raise CheckpointError(f"{path}: field {key!r} missing or not an integer")
    return TrainerState(
        data["step"], data["consumed_samples"], data.get("scheduler", {}), data.get("extra", {})
    )


def _check_optimizer_resumable(optimizer: Any) -> None:
    """Refuse the one resume path known to be wrong rather than diverge silently.

    megatron-core 0.16.1's DistributedOptimizer on the torch-Adam fallback (no Transformer Engine, no apex:
    every CPU and some GPUs) restores Adam's state incorrectly unless ``platform.adam_fallback`` is applied
    (``init_distributed`` does it; items 11-13 of the CPU notes).
    """
    if optimizer is None:
        return
    from megatron.core.optimizer import distrib_optimizer

    from c2f_megatron.platform import adam_fallback

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    if not adam_fallback.is_applied() and any(
        isinstance(o, distrib_optimizer.DistributedOptimizer) for o in opts
    ):
        raise CheckpointError(
            "resuming optim.use_distributed_optimizer=true on megatron-core 0.16.1's torch-Adam fallback "
            "(no Transformer Engine / apex) needs c2f_megatron.platform.adam_fallback.apply() in this "
            "process (init_distributed applies it); without it the optimizer state is restored incorrectly"
        )


def load_training_checkpoint(
    ckpt: str | Path, models: Sequence[ModelState], load_optimizer: bool = True, load_rng: bool = True
) -> TrainerState:
    """Restore models, optimizers and this rank's RNGs from a step directory; returns the trainer state.

    Model and optimizer load at any TP/PP/DP layout (``dp_reshardable`` optimizer state needs the same DP
    layout). RNG states are restored only when the world size matches the saving run's.
    """
    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    if load_optimizer:
        for m in models:
            _check_optimizer_resumable(m.optimizer)
    saved = json.loads((ckpt / TRAINER_STATE_FILE).read_text())
    sharding_type = saved.get("sharding_type", "dp_reshardable")
    for m in models:
        base = ckpt / m.name
        load_model_checkpoint(m.chunks, base)
        if load_optimizer and m.optimizer is not None:
            if not (base / OPTIMIZER_SUBDIR).is_dir():
                raise CheckpointError(
                    f"{base / OPTIMIZER_SUBDIR}: missing (saved with save_optimizer: false?)"
                )
            opt_state = optimizer_sharded_state(m.optimizer, m.chunks, sharding_type, is_loading=True)
            m.optimizer.load_state_dict(load_dist_state(opt_state, base / OPTIMIZER_SUBDIR))
    rng_file = ckpt / RNG_SUBDIR / f"rank_{_rank():05d}.pt"
    if load_rng and saved.get("world_size") == _world() and rng_file.is_file():
        set_rng_state(_load_rng_file(rng_file))
    elif load_rng:
        logger.warning("%s: RNG states not restored (world size changed); dropout streams will differ", ckpt)
    return state


def _load_rng_file(path: Path) -> dict[str, Any]:
    """A rank's RNG state, unpickled with ``weights_only`` (tensors and plain types only): a crafted file in
    a checkpoint directory cannot run code on auto-resume."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path}: not a plain RNG state file ({reason})") from None
