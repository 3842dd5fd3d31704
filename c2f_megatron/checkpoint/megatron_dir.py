"""The c2f megatron checkpoint directory: a megatron-core distributed checkpoint plus what rebuilds it.

Layout (the converters, the merge tool and every trainer read and write this)::

    CKPT/
      c2f_checkpoint.json   model config, tokenizer info, model kind, dtype, provenance
      model/                megatron ``dist_checkpointing`` (torch_dist) of ``model.sharded_state_dict()``
      <other parts>/        trainers add e.g. ``optimizer/`` beside ``model/``

A distributed checkpoint stores global tensors with shard offsets, so ``model/`` written at any TP/PP loads
at any TP/PP. Writes are atomic: everything goes to ``CKPT.partial`` and is renamed to ``CKPT`` after every
rank finished and the JSON was written; a directory without ``c2f_checkpoint.json`` is never complete.
The module imports torch only in the functions that need it (the streaming converters use the rest).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from c2f_megatron.checkpoint import METADATA_FILE, CheckpointError, atomic_dir, dcp_files, manifest
from c2f_megatron.checkpoint.manifest import DIST_CHECKPOINT_FILES
from c2f_megatron.files import write_atomic
from c2f_megatron.models.config import ModelConfig

if TYPE_CHECKING:
    import torch

MODEL_SUBDIR = "model"
FORMAT_NAME = "c2f-megatron"
FORMAT_VERSION = 1


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


def _group() -> Any:
    """``torch.distributed`` when a process group exists, else None (without torch imported there is none,
    so this never imports it)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    dist = _group()
    return dist.get_rank() if dist is not None else 0


def _world() -> int:
    dist = _group()
    return dist.get_world_size() if dist is not None else 1


def rank_and_world() -> tuple[int, int]:
    return _rank(), _world()


def _barrier() -> None:
    dist = _group()
    if dist is not None:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (``[obj]`` in one process)."""
    dist = _group()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def prepare_output(out_dir: str | Path, force: bool = False) -> Path:
    """Refuse an existing output unless ``force``; return a fresh ``.partial`` directory (all ranks)."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: output already exists (pass --force to replace it)")
    tmp = atomic_dir.prepare_output(out, force=True) if _rank() == 0 else atomic_dir.partial_path(out)
    _barrier()
    return tmp


def commit_output(
    tmp: Path,
    out_dir: str | Path,
    metadata: CheckpointMetadata | None,
    written: Sequence[manifest.FileRecord] = (),
) -> Path:
    """Write metadata (rank 0), the manifest and atomically move ``tmp`` to ``out_dir`` once every rank is
    done. ``written``: records of files this rank wrote and fsynced itself (``manifest.RecordingFile``),
    not read back; every rank checksums (and fsyncs) a slice of the others."""
    out = Path(out_dir)
    _barrier()
    if _rank() == 0 and metadata is not None:
        write_atomic(tmp / METADATA_FILE, json.dumps(metadata.to_json(), indent=2, sort_keys=True))
    records = [r for part in all_gather_objects(list(written)) for r in part]
    _barrier()
    known = {r.path for r in records}
    listing = all_gather_objects(
        [p for p in manifest.list_files(tmp) if p not in known] if _rank() == 0 else None
    )
    mine = manifest.file_records(tmp, listing[0][_rank() :: _world()])
    records += [r for part in all_gather_objects(mine) for r in part]
    if _rank() == 0:
        atomic_dir.commit_output(tmp, out, records)
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
    # its writer logs a worker's error before raising it again: the raised one is reported, once
    quiet = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        dist_checkpointing.save(sharded_state, str(directory))
    finally:
        quiet.setLevel(level)


def load_dist_state(sharded_state: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Load a distributed checkpoint part after checking its files against the manifest (sizes; see
    ``manifest.verify``); any failure is one ``CheckpointError`` naming the directory and the file."""
    from megatron.core import dist_checkpointing

    if not (directory / "metadata.json").is_file():
        raise CheckpointError(f"{directory}: no megatron distributed checkpoint here (metadata.json missing)")
    problems = verify_checkpoint(directory)
    if problems:
        raise problems_error(problems)
    check_pickles(directory)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        return dist_checkpointing.load(sharded_state, str(directory))
    except (Exception, CheckpointException) as exc:
        cause = next(iter(getattr(exc, "failures", {}).values()), (exc,))[0]  # torch.dcp wraps per rank
        reason = " ".join(str(cause).split())
        reason = (
            reason.split(". ")[0] if len(reason) > 160 else reason
        ) or "unexpected end of data (truncated?)"
        raise CheckpointError(
            f"{directory}: cannot load the distributed checkpoint ({type(cause).__name__}: {reason})"
        ) from exc


def check_pickles(directory: Path) -> dcp_files.DcpIndex:
    """Refuse a distributed checkpoint whose pickles could run code, before torch reads them, and return
    its index: ``.metadata`` may name nothing but dcp's classes, torch dtypes, sizes and layouts and plain
    containers (``dcp_files.read_index``; torch.distributed.checkpoint reads it with plain
    ``pickle.load``), and ``common.pt`` must be plain data or load with ``weights_only``."""
    for name in DIST_CHECKPOINT_FILES[1:]:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: missing (distributed checkpoint incomplete)")
    index = dcp_files.read_index(directory)
    common = directory / dcp_files.COMMON_FILE
    if dcp_files.is_plain_pickle_archive(common):  # what every model part holds ({}): no torch needed
        return index
    import torch

    try:
        torch.load(common, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())
        reason = (reason.split(". ")[0] if len(reason) > 160 else reason) or type(exc).__name__
        raise CheckpointError(f"{common}: not a plain tensor file ({reason}); refused") from None
    return index


def verify_checkpoint(path: str | Path) -> list[str]:
    """What is wrong with ``path`` against its manifest (``manifest.verify``): every rank checks all sizes
    and the CRC-32 of a slice of the files, and all get the same list. All ranks call it (as they call
    ``dist_checkpointing.load``). A directory verified whole in this process is not read again (resume
    verifies a step, then loads its parts)."""
    path = Path(path)
    found = manifest.find_manifest(path)
    key = None
    if found is not None:
        key = (found[0].resolve(), (found[0] / manifest.MANIFEST_FILE).stat().st_mtime_ns)
        if key in _VERIFIED:
            return []
    world = _world()
    problems = manifest.verify(path, checksums=False) or manifest.verify(path, part=(_rank(), world))
    if world > 1:
        problems = sorted({p for part in all_gather_objects(problems) for p in part})
    if not problems and found is not None and not found[1]:
        _VERIFIED.add(key)
    return problems


_VERIFIED: set[tuple[Path, int]] = set()  # (directory, manifest mtime) checked whole by this process


def problems_error(problems: Sequence[str]) -> CheckpointError:
    """One ``CheckpointError`` line for ``verify_checkpoint``'s problems."""
    more = f" (and {len(problems) - 1} more; `c2f checkpoint verify` lists them)" if len(problems) > 1 else ""
    return CheckpointError(problems[0] + more)


@contextmanager
def verified_while_reading(path: Path) -> Iterator[None]:
    """``verify_checkpoint`` around code that reads the same files: the sizes are checked at once, the
    CRC-32s in a thread while the block runs (the block reads from the page cache what the check reads).
    A problem is raised as one ``CheckpointError`` when the block ends, and when the block fails too, since
    a corrupt file then explains the failure. All ranks enter it."""
    problems = manifest.verify(path, checksums=False)
    if problems:
        raise problems_error(problems)
    pool = ThreadPoolExecutor(1, thread_name_prefix="c2f-verify")
    job = pool.submit(manifest.verify, path, True, (_rank(), _world()))
    try:
        yield
    except BaseException as exc:
        local = job.result()
        if local:
            raise problems_error(local) from exc
        raise
    finally:
        pool.shutdown(wait=True)
    problems = sorted({p for part in all_gather_objects(job.result()) for p in part})
    if problems:
        raise problems_error(problems)


def save_model_checkpoint(
    model_chunks: Sequence[torch.nn.Module],
    out_dir: str | Path,
    metadata: CheckpointMetadata,
    force: bool = False,
    extra_parts: Callable[[Path], None] | None = None,
    extra_bytes: int = 0,
) -> Path:
    """Save this rank's model shards (all ranks call it) as a complete c2f checkpoint at ``out_dir``.

    ``extra_parts(tmp_dir)`` may write more parts (optimizer, trainer state, about ``extra_bytes``) before
    the commit.
    """
    out = Path(out_dir)
    with atomic_dir.cleanup_on_failure(out, need_bytes=model_bytes(metadata) + extra_bytes):
        tmp = prepare_output(out, force=force)
        save_dist_state(sharded_model_state(model_chunks), tmp / MODEL_SUBDIR)
        if extra_parts is not None:
            extra_parts(tmp)
        return commit_output(tmp, out, metadata)


def model_bytes(metadata: CheckpointMetadata) -> int:
    """About the bytes of a checkpoint's ``model/`` part: its parameters, vocabulary padding included, at its
    dtype."""
    cfg = metadata.model
    padding = (cfg.padded_vocab_size() - cfg.vocab_size) * cfg.hidden_size
    padding *= 2 if cfg.untie_embeddings_and_output_weights else 1
    return (cfg.num_parameters() + padding) * (4 if metadata.dtype == "fp32" else 2)


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
