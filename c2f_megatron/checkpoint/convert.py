"""Exact HF (Mistral / Llama family) <-> c2f megatron checkpoint conversion, at any TP/PP, streaming
tensor by tensor.

HF -> megatron: every rank builds the stock ``GPTModel`` of its TP/PP shard without random initialisation,
fills each parameter from lazily read (``safe_open`` slices) HF tensors, and saves with
``save_model_checkpoint``: the ``model/`` keys are exactly megatron's own, so the result loads at any TP/PP.
Megatron -> HF: every rank builds its shard, ``load_model_checkpoint`` fills it, and tensors are gathered
over TP one at a time and streamed into safetensors shards by the TP rank 0 of each pipeline stage.
Peak memory is about one copy of the rank's shard in the model dtype. Everything is checked (config,
tensor names and shapes, layout divisibility, output path) before any process group starts, and output is
written to ``OUT.partial`` and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from c2f_megatron.checkpoint import HF_SIDE_FILES, TOKENIZER_FILES, atomic_dir
from c2f_megatron.checkpoint import hf_mapping as hm
from c2f_megatron.checkpoint.hf_dir import (
    HFCheckpoint,
    ShardWriter,
    name_shards,
    open_hf_checkpoint,
    parse_size,
    read_hf_config,
)
from c2f_megatron.checkpoint.hf_mapping import ConversionError
from c2f_megatron.checkpoint.megatron_dir import (
    METADATA_FILE,
    CheckpointMetadata,
    commit_output,
    load_model_checkpoint,
    prepare_output,
    read_metadata,
    save_model_checkpoint,
)
from c2f_megatron.models.config import DTYPES, ModelConfig

TOKENIZER_SUBDIR = "tokenizer"
DEFAULT_MAX_SHARD = "5GB"


@dataclasses.dataclass
class ConversionReport:
    out: Path
    seconds: float
    max_logit_diff: float | None = None
    tolerance: float | None = None


# ------------------------------------------------------------------------------------------ HF reading


def check_hf_tensors(ckpt: HFCheckpoint, cfg: ModelConfig) -> None:
    """Refuse missing, extra or mis-shaped tensors, by name. ``rotary_emb.inv_freq`` buffers, and the
    ``lm_head.weight`` some tied checkpoints still store (transformers ignores it too), are not read."""
    expected = hm.expected_hf_shapes(cfg)
    present = {n for n in ckpt.tensors if not n.endswith("rotary_emb.inv_freq")}
    if cfg.tied_embeddings:
        present.discard(hm.LM_HEAD.hf[0])
    missing = [n for n in expected if n not in present]
    extra = sorted(present - set(expected))
    if missing:
        raise ConversionError(
            f"{ckpt.path}: missing tensor(s) {', '.join(missing[:8])}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )
    if extra:
        raise ConversionError(
            f"{ckpt.path}: unexpected tensor(s) {', '.join(extra[:8])}"
            + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
            + f" (not a plain {hm.HF_CLASSES[cfg.family][0]})"
        )
    for name, shape in expected.items():
        if ckpt.tensors[name].shape != shape:
            raise ConversionError(
                f"{ckpt.tensors[name].file}: tensor {name!r} has shape {list(ckpt.tensors[name].shape)}, "
                f"config.json implies {list(shape)}"
            )


def check_layout(cfg: ModelConfig, tp: int, pp: int, source: str) -> None:
    """TP must divide heads and query groups (and so the per-group QKV), PP must divide the layers."""
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp and --pp must be >= 1, got tp={tp} pp={pp}")
    for field, n in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_query_groups),
    ):
        if n % tp:
            raise ConversionError(
                f"{source}: field '{field}' = {n} is not divisible by tensor parallel size {tp}"
            )
    if cfg.ffn_hidden_size % tp:
        raise ConversionError(
            f"{source}: field 'intermediate_size' = {cfg.ffn_hidden_size} is not divisible by tensor parallel size {tp}"
        )
    if cfg.num_layers % pp:
        raise ConversionError(
            f"{source}: field 'num_hidden_layers' = {cfg.num_layers} is not divisible by pipeline parallel size {pp}"
        )


def _check_output(out: str | Path, force: bool) -> None:
    if Path(out).exists() and not force:
        raise ConversionError(f"{out}: output already exists (pass --force to replace it)")


# ------------------------------------------------------------------------------------ HF -> megatron


def _rank_tensor(
    ckpt: HFCheckpoint, rule: hm.TensorRule, layer: int | None, cfg: ModelConfig, tp: int, rank: int
) -> Tensor:
    """The tensor TP rank ``rank`` holds for one megatron parameter, read from HF slices."""
    names = hm.hf_names_of(rule, layer)
    if rule.kind == "replicated":
        return ckpt.read(names[0])
    if rule.kind == "row":
        return ckpt.read(names[0], cols=hm.tp_range(ckpt.tensors[names[0]].shape[1], tp, rank))
    if rule.kind == "qkv":
        d = cfg.head_dim
        q = ckpt.read(names[0], rows=hm.tp_range(cfg.num_attention_heads * d, tp, rank))
        k = ckpt.read(names[1], rows=hm.tp_range(cfg.num_query_groups * d, tp, rank))
        v = ckpt.read(names[2], rows=hm.tp_range(cfg.num_query_groups * d, tp, rank))
        return hm.qkv_to_megatron(q, k, v, cfg.num_attention_heads // tp, cfg.num_query_groups // tp)
    if rule.kind == "fc1":
        rows = hm.tp_range(cfg.ffn_hidden_size, tp, rank)
        return hm.fc1_to_megatron(ckpt.read(names[0], rows=rows), ckpt.read(names[1], rows=rows))
    if rule.kind == "vocab":
        start, real, zeros = hm.vocab_rows_for_rank(cfg.vocab_size, cfg.padded_vocab_size(tp), tp, rank)
        part = ckpt.read(names[0], rows=(start, start + real))
        return torch.cat([part, part.new_zeros(zeros, part.shape[1])]) if zeros else part
    raise ValueError(f"unknown tensor kind {rule.kind!r}")


def _layer_offset(chunk: torch.nn.Module, local: int) -> int:
    return chunk.decoder.layers[local].layer_number - 1


def fill_from_hf(chunk: torch.nn.Module, ckpt: HFCheckpoint, cfg: ModelConfig) -> None:
    """Copy this rank's slice of every HF tensor into a freshly built (uninitialised) model chunk."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(chunk.named_parameters())
    spec = hm.detect_layer_spec(list(params))
    with torch.no_grad():
        for name, param in params.items():
            try:
                rule, local = hm.rule_for(name, spec, cfg.tied_embeddings)
            except KeyError as exc:
                raise ConversionError(str(exc)) from exc
            layer = None if local is None else _layer_offset(chunk, local)
            value = _rank_tensor(ckpt, rule, layer, cfg, tp, rank)
            if tuple(value.shape) != tuple(param.shape):
                raise ConversionError(
                    f"megatron parameter {name!r} has shape {list(param.shape)} on TP rank {rank}, the HF "
                    f"tensor(s) {hm.hf_names_of(rule, layer)} give {list(value.shape)}"
                )
            param.copy_(value)
            del value


def _tokenizer_info(hf_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    """Tokenizer (and side) files to carry over and the info recorded about the tokenizer (the default
    Mistral one when the directory has no tokenizer files)."""
    from c2f_megatron.data.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

    files = [hf_dir / n for n in (*TOKENIZER_FILES, *HF_SIDE_FILES) if (hf_dir / n).is_file()]
    if not any(f.name in TOKENIZER_FILES for f in files):
        info = {"spec": DEFAULT_TOKENIZER, "files": [], **load_tokenizer(None).info().to_dict()}
        return info, files
    info: dict[str, Any] = {"spec": TOKENIZER_SUBDIR, "files": [f.name for f in files]}
    spec = str(hf_dir / "tokenizer.model") if (hf_dir / "tokenizer.model").is_file() else str(hf_dir)
    try:
        info.update(load_tokenizer(spec).info().to_dict())
    except Exception as exc:  # a tokenizer we cannot load still travels with the weights, recorded as such
        info["load_error"] = f"{type(exc).__name__}: {exc}"
    return info, files


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out: str | Path,
    dtype: str | None = None,
    force: bool = False,
    verify: bool = False,
    tp: int = 1,
    pp: int = 1,
    verify_seq_len: int = 32,
    verify_tolerance: float | None = None,
) -> ConversionReport:
    """Convert an HF Mistral/Llama directory into a c2f megatron checkpoint at ``out`` (all ranks call it).

    ``tp``/``pp`` is the layout used while converting (each rank reads only its slices); the result loads
    at any layout. ``verify`` compares logits of both models on a fixed sequence and raises above the
    tolerance (1e-4 in fp32; 2% of the largest HF logit in bf16/fp16).
    """
    start = time.perf_counter()
    from c2f_megatron.models.gpt import build_gpt_model
    from c2f_megatron.platform.distributed import ParallelConfig, init_distributed

    hf_dir = Path(hf_dir)
    _check_output(out, force)
    # the architecture first: a model we cannot express is refused before its shards are looked at
    cfg = hm.model_config_from_hf(read_hf_config(hf_dir, ConversionError), str(hf_dir / "config.json"), dtype)
    ckpt = open_hf_checkpoint(hf_dir, ConversionError)
    check_hf_tensors(ckpt, cfg)
    check_layout(cfg, tp, pp, str(hf_dir / "config.json"))
    tokenizer, tokenizer_files = _tokenizer_info(hf_dir)

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    chunk = build_gpt_model(cfg, perform_initialization=False)
    fill_from_hf(chunk, ckpt, cfg)
    metadata = CheckpointMetadata(
        model=cfg,
        tokenizer=tokenizer,
        kind="gpt",
        dtype=cfg.params_dtype,
        provenance={
            "converted_from": str(hf_dir.resolve()),
            "format": f"huggingface-{cfg.family}",
            "converter": "c2f_megatron.checkpoint.convert",
            "convert_layout": {"tp": tp, "pp": pp},
        },
    )

    def copy_tokenizer(tmp: Path) -> None:
        if tokenizer_files and _is_global_rank_zero():
            (tmp / TOKENIZER_SUBDIR).mkdir()
            for f in tokenizer_files:
                shutil.copy2(f, tmp / TOKENIZER_SUBDIR / f.name)

    report = ConversionReport(Path(out), 0.0)
    if verify:  # before the save, so a failed verification leaves no output behind
        from c2f_megatron.checkpoint.verify import verify_against_hf

        report.max_logit_diff, report.tolerance = verify_against_hf(
            chunk, cfg, hf_dir, verify_seq_len, verify_tolerance
        )
    side = sum(f.stat().st_size for f in tokenizer_files)
    save_model_checkpoint([chunk], out, metadata, force=force, extra_parts=copy_tokenizer, extra_bytes=side)
    report.seconds = time.perf_counter() - start
    return report


# ------------------------------------------------------------------------------------ megatron -> HF


def _gather_tp(local: Tensor) -> list[Tensor]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [local]
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return shards


def hf_tensors_of(
    name: str, param: Tensor, rule: hm.TensorRule, layer: int | None, cfg: ModelConfig
) -> Iterator[tuple[str, Tensor]]:
    """The global HF tensor(s) of one megatron parameter (TP shards gathered; all TP ranks call it)."""
    shards = _gather_tp(param.detach())
    names = hm.hf_names_of(rule, layer)
    if rule.kind == "replicated":
        yield names[0], shards[0]
    elif rule.kind == "row":
        yield names[0], torch.cat(shards, dim=1) if len(shards) > 1 else shards[0]
    elif rule.kind == "vocab":
        full = torch.cat(shards) if len(shards) > 1 else shards[0]
        yield names[0], hm.trim_vocab(full, cfg.vocab_size)
    elif rule.kind == "qkv":
        full = torch.cat(shards) if len(shards) > 1 else shards[0]
        yield from zip(names, hm.qkv_from_megatron(full, cfg.num_attention_heads, cfg.num_query_groups))
    elif rule.kind == "fc1":
        yield from zip(names, hm.fc1_from_tp_shards(shards))
    else:
        raise ValueError(f"unknown tensor kind {rule.kind!r} for {name}")


def convert_megatron_to_hf(
    megatron_dir: str | Path,
    out: str | Path,
    dtype: str | None = None,
    force: bool = False,
    tp: int = 1,
    pp: int = 1,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
) -> ConversionReport:
    """Export a c2f megatron checkpoint to an HF Mistral/Llama directory (safetensors shards + index +
    config).

    Padded vocab rows are dropped; ``dtype`` defaults to the checkpoint's. All ranks call it.
    """
    start = time.perf_counter()
    _check_output(out, force)
    meta = read_metadata(megatron_dir)
    source = str(Path(megatron_dir) / METADATA_FILE)
    if meta.kind != "gpt":
        raise ConversionError(f"{source}: field 'kind' is {meta.kind!r}; only 'gpt' (LM head) exports to HF")
    cfg = meta.model
    out_dtype = dtype or meta.dtype
    if out_dtype not in DTYPES:
        raise ConversionError(f"dtype {out_dtype!r} is not one of {sorted(DTYPES)}")
    hf_config = hm.hf_config_from_model(cfg, out_dtype, meta.tokenizer)
    check_layout(cfg, tp, pp, source)
    max_bytes = parse_size(max_shard_size, ConversionError)
    import torch.distributed as dist
    from megatron.core import parallel_state

    from c2f_megatron.models.gpt import build_gpt_model
    from c2f_megatron.platform.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    chunk = build_gpt_model(cfg, perform_initialization=False)
    load_model_checkpoint([chunk], megatron_dir)
    tok_dir = Path(megatron_dir) / TOKENIZER_SUBDIR
    side = sum(f.stat().st_size for f in tok_dir.iterdir()) if tok_dir.is_dir() else 0
    need = cfg.num_parameters() * DTYPES[out_dtype].itemsize + side
    with atomic_dir.cleanup_on_failure(Path(out), need_bytes=need):
        tmp = prepare_output(out, force=force)
        writer_rank = (
            parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        )
        stage = parallel_state.get_pipeline_model_parallel_rank()
        writer = ShardWriter(tmp, f"part-{stage:03d}", max_bytes)
        params = dict(chunk.named_parameters())
        spec = hm.detect_layer_spec(list(params))
        with torch.no_grad():
            for name, param in params.items():
                rule, local = hm.rule_for(name, spec, cfg.tied_embeddings)
                if rule is hm.TIED_HEAD:  # the last stage's copy of the embedding (exported by the first)
                    continue
                layer = None if local is None else _layer_offset(chunk, local)
                for hf_name, tensor in hf_tensors_of(name, param, rule, layer, cfg):
                    if writer_rank:
                        writer.add(hf_name, tensor.to(DTYPES[out_dtype]))
        writer.flush()
        del chunk, params

        written = writer.written if writer_rank else []
        if dist.is_initialized():
            everything: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everything, written)
            written = [w for part in everything for w in part]
        if _is_global_rank_zero():
            _finish_hf_dir(tmp, sorted(written), hf_config, Path(megatron_dir), meta)
        commit_output(tmp, out, None)
    return ConversionReport(Path(out), time.perf_counter() - start)


def _finish_hf_dir(
    tmp: Path,
    written: list[tuple[str, list[str], int]],
    hf_config: dict[str, Any],
    megatron_dir: Path,
    meta: CheckpointMetadata,
) -> None:
    """Rename the shards to HF's ``model-0000i-of-0000n`` names, write the index, config and tokenizer."""
    name_shards(tmp, written)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    tok_dir = megatron_dir / TOKENIZER_SUBDIR
    if tok_dir.is_dir():
        for f in sorted(tok_dir.iterdir()):
            shutil.copy2(f, tmp / f.name)
    (tmp / "c2f_provenance.json").write_text(
        json.dumps(
            {
                "converted_from": str(megatron_dir.resolve()),
                "provenance": meta.provenance,
                "tokenizer": meta.tokenizer,
            },
            indent=2,
            sort_keys=True,
        )
    )


def _is_global_rank_zero() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
