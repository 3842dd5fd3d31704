"""Exact HF (Mistral / Llama family) <-> c2f megatron checkpoint conversion, streaming chunk by chunk.

Neither direction builds a model. A megatron ``model/`` part is megatron's ``torch_dist`` checkpoint: global
tensors (layers stacked on a first dimension) stored as chunks of any shape, which megatron's loader reads
at any TP/PP (``dcp_files``). ``hf_mapping.dist_units`` says which contiguous element ranges of which HF
tensors fill each chunk (fused QKV interleaved per query group, fc1 as its gate and up halves, the vocab
padded with zero rows), so:

- HF -> megatron reads those ranges with ``preadv`` straight into the chunk's buffer (and its CRC-32) in a
  reader thread, while this thread appends the previous chunk to a ``.distcp`` file as the archive
  ``torch.save`` would write; then it writes the dcp index. Under torchrun the ranks split the layers, one
  file each.
- megatron -> HF reads the same plan backwards (``hf_mapping.hf_row_sources``): every HF tensor is rows of
  global megatron tensors, copied out of whatever chunks hold them (any TP/PP the checkpoint was saved at)
  into safetensors shards whose headers are written up front. Under torchrun the ranks split the shards.

Memory is a few chunks (the largest is the embedding), whatever the depth. Output files keep their size and
CRC-32 as they are written (``manifest.RecordingFile``), so the manifest reads nothing back. Torch is
imported only for a dtype change, ``--verify`` or torchrun. Everything is checked (config, tensor names,
shapes and dtypes, layout divisibility, output path) before anything is written, and output goes to
``OUT.partial``, renamed at the end. ``--verify`` loads the written checkpoint through megatron's own loader
at ``--tp``/``--pp`` and compares its logits with transformers'.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from c2f_megatron.checkpoint import (
    HF_SIDE_FILES,
    TOKENIZER_FILES,
    CheckpointError,
    atomic_dir,
    dcp_files,
    manifest,
)
from c2f_megatron.checkpoint import hf_mapping as hm
from c2f_megatron.checkpoint.hf_dir import (
    DTYPE_BYTES,
    HFCheckpoint,
    PositionedReader,
    StreamedShardFile,
    open_hf_checkpoint,
    parse_size,
    read_hf_config,
    shard_file_names,
    write_shard_index,
)
from c2f_megatron.checkpoint.hf_mapping import ConversionError
from c2f_megatron.checkpoint.megatron_dir import (
    METADATA_FILE,
    MODEL_SUBDIR,
    CheckpointMetadata,
    all_gather_objects,
    check_pickles,
    commit_output,
    load_dist_state,
    model_bytes,
    prepare_output,
    rank_and_world,
    read_metadata,
    sharded_model_state,
    verified_while_reading,
)
from c2f_megatron.models.config import DTYPE_NAMES, ModelConfig

if TYPE_CHECKING:
    from torch import Tensor

TOKENIZER_SUBDIR = "tokenizer"
DEFAULT_MAX_SHARD = "5GB"
# Chunks (HF -> megatron) or tensors (megatron -> HF) read ahead of the one being written.
PREFETCH = 2
DTYPE_TO_ST = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}


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


def _start_ranks(tp: int, pp: int, megatron_groups: bool) -> tuple[int, int]:
    """(rank, world size): one process (torch not imported), or torchrun's ranks over gloo; megatron's
    TP/PP groups only when a model is built (``--verify``)."""
    if megatron_groups:
        from c2f_megatron.platform.distributed import ParallelConfig, init_distributed

        init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
    return rank_and_world()


def _check_float(st_dtype: str, where: str) -> None:
    if st_dtype not in dcp_files.ST_TO_TORCH:
        raise ConversionError(f"{where}: dtype {st_dtype}; only float tensors (F32/BF16/F16/F64) convert")


def _cast(data: bytearray | memoryview, src: str, dst: str) -> memoryview:
    """Raw ``src`` elements (safetensors dtype names) as raw ``dst`` ones, rounded as torch rounds."""
    import torch

    value = torch.frombuffer(data, dtype=getattr(torch, dcp_files.ST_TO_TORCH[src]))
    return memoryview(value.to(getattr(torch, dcp_files.ST_TO_TORCH[dst])).view(torch.uint8).numpy())


def _read_chunk(
    ckpt: HFCheckpoint, reader: PositionedReader, chunk: hm.DistChunk, out: str
) -> tuple[memoryview, int]:
    """One megatron chunk's raw bytes in dtype ``out``, filled from its HF element ranges (``preadv``
    straight into place; a dtype change is the only copy), and their CRC-32."""
    entries = [ckpt.tensors[p.hf] for p in chunk.pieces]
    src = {e.dtype for e in entries}
    st = src.pop() if len(src) == 1 else out  # pieces of several dtypes (q/k/v saved apart): each cast
    size = DTYPE_BYTES[st]
    buf = bytearray(chunk.numel * size)  # zeros: the vocab padding rows stay zero
    view = memoryview(buf)
    for p, e in zip(chunk.pieces, entries):
        where = view[p.dst * size : (p.dst + p.n) * size]
        if e.dtype == st:
            reader.read_into(e.file, e.begin + p.src * DTYPE_BYTES[e.dtype], where, p.n * size)
        else:
            piece = bytearray(p.n * DTYPE_BYTES[e.dtype])
            reader.read_into(e.file, e.begin + p.src * DTYPE_BYTES[e.dtype], piece, len(piece))
            where[:] = _cast(piece, e.dtype, st)
    data = view if st == out else _cast(buf, st, out)
    return data, zlib.crc32(data)


def _write_units(
    ckpt: HFCheckpoint, cfg: ModelConfig, units: list[list[hm.DistChunk]], path: Path
) -> tuple[dict[str, Any], manifest.FileRecord]:
    """Write ``units`` into one ``.distcp`` file: a reader thread fills the next chunks (at most
    ``PREFETCH`` ahead) while this thread archives the current one. Returns the chunks' places and the
    file's manifest record."""
    out = DTYPE_TO_ST[cfg.params_dtype]
    reader = PositionedReader(ConversionError)
    writer = dcp_files.ChunkFileWriter(path, f"{path.parent.name}/{path.name}")
    extra_state = dcp_files.object_payload(None)
    work: list[tuple[hm.DistChunk, list[str]]] = []
    for unit in units:
        for i, chunk in enumerate(unit):
            last = i == len(unit) - 1 and chunk.key.startswith(hm.LAYER_KEY_PREFIX)
            objects = hm.extra_state_keys(chunk.offsets[0], cfg.num_layers) if last else []
            work.append((chunk, objects))
    pool = ThreadPoolExecutor(1, thread_name_prefix="c2f-convert-read")
    pending: deque[Future] = deque()
    try:
        for chunk, _ in work[:PREFETCH]:
            pending.append(pool.submit(_read_chunk, ckpt, reader, chunk, out))
        for i, (chunk, objects) in enumerate(work):
            data, crc = pending.popleft().result()
            if i + PREFETCH < len(work):
                pending.append(pool.submit(_read_chunk, ckpt, reader, work[i + PREFETCH][0], out))
            writer.tensor(chunk.key, chunk.offsets, chunk.sizes, out, data, crc)
            del data
            for key in objects:
                writer.object(key, extra_state)
        record = writer.close()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writer.abandon()
        reader.close()
    return writer.records(), record


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

    Streams chunk by chunk into megatron's ``torch_dist`` files (no model is built); under torchrun the
    ranks split the layers. The result loads at any layout; ``tp`` sets the vocab padding (a multiple of
    ``make_vocab_size_divisible_by * tp``) and, with ``verify``, the layout of the megatron model whose
    logits are compared with transformers' (tolerance 1e-4 in fp32; 2% of the largest HF logit in bf16/fp16).
    """
    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    _check_output(out, force)
    # the architecture first: a model we cannot express is refused before its shards are looked at
    cfg = hm.model_config_from_hf(read_hf_config(hf_dir, ConversionError), str(hf_dir / "config.json"), dtype)
    ckpt = open_hf_checkpoint(hf_dir, ConversionError)
    check_hf_tensors(ckpt, cfg)
    check_layout(cfg, tp, pp, str(hf_dir / "config.json"))
    for name in hm.expected_hf_shapes(cfg):
        _check_float(ckpt.tensors[name].dtype, f"{ckpt.tensors[name].file}: tensor {name!r}")
    tokenizer, tokenizer_files = _tokenizer_info(hf_dir)
    rank, world = _start_ranks(tp, pp, megatron_groups=verify)
    padded = cfg.padded_vocab_size(tp)
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
    report = ConversionReport(Path(out), 0.0)
    need = model_bytes(metadata) + sum(f.stat().st_size for f in tokenizer_files)
    with atomic_dir.cleanup_on_failure(Path(out), need_bytes=need):
        tmp = prepare_output(out, force=force)
        part = tmp / MODEL_SUBDIR
        if rank == 0:
            part.mkdir()
            if tokenizer_files:
                (tmp / TOKENIZER_SUBDIR).mkdir()
                for f in tokenizer_files:
                    shutil.copy2(f, tmp / TOKENIZER_SUBDIR / f.name)
        all_gather_objects(None)  # the directories exist before any rank writes into them
        units = hm.dist_units(cfg, padded)
        places, record = _write_units(ckpt, cfg, units[rank::world], part / f"__{rank}_0.distcp")
        written = [record]
        everything = all_gather_objects(places)
        if rank == 0:
            torch_name = dcp_files.ST_TO_TORCH[DTYPE_TO_ST[cfg.params_dtype]]
            shapes = {k: (s, torch_name) for k, s in hm.dist_shapes(cfg, padded).items()}
            written += dcp_files.write_index(part, shapes, everything)
        all_gather_objects(None)
        if verify:  # before the commit, so a failed verification leaves no output behind
            report.max_logit_diff, report.tolerance = _verify_written(
                part, cfg, hf_dir, verify_seq_len, verify_tolerance
            )
        commit_output(tmp, out, metadata, written)
    report.seconds = time.perf_counter() - start
    return report


def _verify_written(
    part: Path, cfg: ModelConfig, hf_dir: Path, seq_len: int, tolerance: float | None
) -> tuple[float, float]:
    """Load the written ``model/`` part through megatron's own loader at the current layout and compare
    its logits with transformers'."""
    from c2f_megatron.checkpoint.verify import verify_against_hf
    from c2f_megatron.models.gpt import build_gpt_model

    chunk = build_gpt_model(cfg, perform_initialization=False)
    chunk.load_state_dict(load_dist_state(sharded_model_state([chunk]), part))
    return verify_against_hf(chunk, cfg, hf_dir, seq_len, tolerance)


# ------------------------------------------------------------------------------------ megatron -> HF


def _gather_tp(local: Tensor) -> list[Tensor]:
    import torch
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
    import torch

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


@dataclasses.dataclass(frozen=True)
class _HFTensor:
    name: str
    shape: tuple[int, ...]
    stored: str  # safetensors dtype in the megatron checkpoint
    out: str  # safetensors dtype written
    sources: tuple[hm.RowSource, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _export_plan(cfg: ModelConfig, index: dcp_files.DcpIndex, out_dtype: str) -> list[_HFTensor]:
    """Every HF tensor with the megatron rows it comes from, checked against the checkpoint's index."""
    emb = index.tensors.get(hm.EMBEDDING.megatron)
    if emb is None:
        raise ConversionError(f"{index.directory}: tensor {hm.EMBEDDING.megatron!r} missing from .metadata")
    padded = emb.shape[0]
    expected = hm.dist_shapes(cfg, padded)
    for key, shape in expected.items():
        info = index.tensors.get(key)
        if info is None:
            raise ConversionError(f"{index.directory / dcp_files.DCP_INDEX}: tensor {key!r} missing")
        if info.shape != shape:
            raise ConversionError(
                f"{index.directory / dcp_files.DCP_INDEX}: tensor {key!r} has shape {list(info.shape)}, "
                f"c2f_checkpoint.json implies {list(shape)}"
            )
        if info.dtype not in DTYPE_BYTES or info.dtype not in dcp_files.ST_TO_TORCH:
            raise ConversionError(
                f"{index.directory}: tensor {key!r} has dtype {info.dtype}; not a float model"
            )
    sources = hm.hf_row_sources(cfg, padded)
    out = DTYPE_TO_ST[out_dtype]
    return [
        _HFTensor(name, shape, index.tensors[sources[name][0].key].dtype, out, tuple(sources[name]))
        for name, shape in hm.expected_hf_shapes(cfg).items()
    ]


class _Assembler:
    """Reads one HF tensor's bytes out of the checkpoint's chunks, whatever TP/PP wrote them: full-width
    chunk rows go straight into place, column-split chunks (row-parallel layers saved at TP > 1) through
    one row block."""

    def __init__(self, index: dcp_files.DcpIndex) -> None:
        self.index = index
        self.reader = PositionedReader(CheckpointError)
        self._data: dict[tuple[str, int], int] = {}

    def _data_offset(self, chunk: dcp_files.Chunk, size: int, key: str) -> int:
        where = (chunk.file, chunk.begin)
        if where not in self._data:
            fd = self.reader.fd(self.index.directory / chunk.file)
            label = f"{self.index.directory / chunk.file}: tensor {key!r} chunk at {list(chunk.offsets)}"
            end, size_on_disk = chunk.begin + chunk.length, os.fstat(fd).st_size
            if end > size_on_disk:
                raise CheckpointError(f"{label} ends at byte {end}, the file has {size_on_disk} (truncated?)")
            self._data[where] = dcp_files.chunk_data_offset(fd, chunk, size, label)
        return self._data[where]

    def read(self, t: _HFTensor) -> tuple[memoryview, int]:
        """The tensor's bytes (C order, in its output dtype) and their CRC-32."""
        rows, cols = (1, t.shape[0]) if len(t.shape) == 1 else t.shape
        size = DTYPE_BYTES[t.stored]
        buf = bytearray(t.numel * size)
        view = memoryview(buf)
        covered = 0
        for s in t.sources:
            info = self.index.tensors[s.key]
            for ch in info.chunks:
                offsets, sizes, li = ch.offsets, ch.sizes, 0
                if s.layer is not None:
                    if not offsets[0] <= s.layer < offsets[0] + sizes[0]:
                        continue
                    li, offsets, sizes = s.layer - offsets[0], offsets[1:], sizes[1:]
                r0, rs, c0, cs = (
                    (0, 1, offsets[0], sizes[0])
                    if len(offsets) == 1
                    else (*offsets[:1], sizes[0], offsets[1], sizes[1])
                )
                a, b = max(r0, s.row), min(r0 + rs, s.row + s.n)
                if a >= b:
                    continue
                file = self.index.directory / ch.file
                begin = self._data_offset(ch, size, s.key) + (li * rs + a - r0) * cs * size
                dst = (s.dst + a - s.row) * cols
                if cs == cols:
                    n = (b - a) * cols * size
                    self.reader.read_into(file, begin, view[dst * size : dst * size + n], n)
                else:
                    block = bytearray((b - a) * cs * size)
                    self.reader.read_into(file, begin, block, len(block))
                    width = cs * size
                    for i in range(b - a):
                        at = (dst + i * cols + c0) * size
                        view[at : at + width] = block[i * width : (i + 1) * width]
                covered += (b - a) * cs
        if covered != rows * cols:
            raise CheckpointError(
                f"{self.index.directory}: the chunks of {t.sources[0].key!r} cover {covered} of the "
                f"{rows * cols} elements of HF tensor {t.name!r} (incomplete checkpoint?)"
            )
        data = view if t.stored == t.out else _cast(buf, t.stored, t.out)
        return data, zlib.crc32(data)

    def close(self) -> None:
        self.reader.close()


def _split_shards(tensors: list[_HFTensor], max_bytes: int) -> list[list[_HFTensor]]:
    """HF order, a new shard when the next tensor would pass ``max_bytes`` (a tensor is never split)."""
    shards: list[list[_HFTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.numel * DTYPE_BYTES[t.out]
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _write_shards(
    tmp: Path, index: dcp_files.DcpIndex, shards: list[tuple[str, list[_HFTensor]]]
) -> list[manifest.FileRecord]:
    """Write this rank's shards: a reader thread assembles the next tensors (at most ``PREFETCH`` ahead)
    while this thread writes the current one. Returns the shards' manifest records."""
    work = [(file, i, t) for file, tensors in shards for i, t in enumerate(tensors)]
    assembler = _Assembler(index)
    pool = ThreadPoolExecutor(1, thread_name_prefix="c2f-convert-read")
    pending: deque[Future] = deque(pool.submit(assembler.read, t) for _, _, t in work[:PREFETCH])
    by_file = dict(shards)
    files: dict[str, StreamedShardFile] = {}
    written = []
    try:
        for k, (file, i, _) in enumerate(work):
            if i == 0:
                entries = [(x.name, x.out, x.shape) for x in by_file[file]]
                files[file] = StreamedShardFile(tmp / file, entries, {"format": "pt"})
            data, crc = pending.popleft().result()
            if k + PREFETCH < len(work):
                pending.append(pool.submit(assembler.read, work[k + PREFETCH][2]))
            files[file].write(data, crc)
            del data
            if i == len(by_file[file]) - 1:
                written.append(files[file].close())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        assembler.close()
        for f in files.values():
            f.abandon()
    return written


def convert_megatron_to_hf(
    megatron_dir: str | Path,
    out: str | Path,
    dtype: str | None = None,
    force: bool = False,
    tp: int = 1,
    pp: int = 1,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
) -> ConversionReport:
    """Export a c2f megatron checkpoint (written at any TP/PP) to an HF Mistral/Llama directory
    (safetensors shards + index + config), streaming tensor by tensor from megatron's ``torch_dist``
    files; no model is built. Under torchrun the ranks split the shards (``tp``/``pp`` only need to fit
    the model). Padded vocab rows are dropped; ``dtype`` defaults to the checkpoint's. All ranks call it.
    """
    start = time.perf_counter()
    _check_output(out, force)
    meta = read_metadata(megatron_dir)
    source = str(Path(megatron_dir) / METADATA_FILE)
    if meta.kind != "gpt":
        raise ConversionError(f"{source}: field 'kind' is {meta.kind!r}; only 'gpt' (LM head) exports to HF")
    cfg = meta.model
    out_dtype = dtype or meta.dtype
    if out_dtype not in DTYPE_NAMES:
        raise ConversionError(f"dtype {out_dtype!r} is not one of {sorted(DTYPE_NAMES)}")
    hf_config = hm.hf_config_from_model(cfg, out_dtype, meta.tokenizer)
    check_layout(cfg, tp, pp, source)
    max_bytes = parse_size(max_shard_size, ConversionError)
    part = Path(megatron_dir) / MODEL_SUBDIR
    rank, world = _start_ranks(tp, pp, megatron_groups=False)
    tok_dir = Path(megatron_dir) / TOKENIZER_SUBDIR
    side = sum(f.stat().st_size for f in tok_dir.iterdir()) if tok_dir.is_dir() else 0
    need = cfg.num_parameters() * DTYPE_BYTES[DTYPE_TO_ST[out_dtype]] + side
    with atomic_dir.cleanup_on_failure(Path(out), need_bytes=need):
        # the CRC-32s of the checkpoint are checked while it is read (it must verify before the commit)
        with verified_while_reading(part):
            index = check_pickles(part)  # as every loader does, though only the index and chunks are read
            plan = _export_plan(cfg, index, out_dtype)
            shards = _split_shards(plan, max_bytes)
            names = shard_file_names(len(shards))
            tmp = prepare_output(out, force=force)
            mine = [(names[i], shards[i]) for i in range(rank, len(shards), world)]
            written = _write_shards(tmp, index, mine)
        if rank == 0:
            listing = [
                (n, [t.name for t in s], sum(t.numel * DTYPE_BYTES[t.out] for t in s))
                for n, s in zip(names, shards)
            ]
            write_shard_index(tmp, listing)
            _finish_hf_dir(tmp, hf_config, Path(megatron_dir), meta)
        commit_output(tmp, out, None, written)
    return ConversionReport(Path(out), time.perf_counter() - start)


def _finish_hf_dir(
    tmp: Path,
    hf_config: dict[str, Any],
    megatron_dir: Path,
    meta: CheckpointMetadata,
) -> None:
    """config.json, the tokenizer files and the provenance beside the shards."""
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
