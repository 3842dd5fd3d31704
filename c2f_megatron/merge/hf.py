"""Merge HF safetensors directories by streaming: every input byte is read once, every output written once.

The safetensors layout (8-byte header length, JSON header with dtype/shape/offsets, then raw data) lets the
merge read each tensor in chunks straight from its file into a reused buffer, convert to fp32 once, evaluate
every requested output (all gammas of a sweep), and append the results to output shards whose headers were
written up front. Memory stays at a few chunk buffers whatever the model size; the output keeps the first
input's shard names and index. Files go to ``OUT.partial`` and are renamed to ``OUT`` when complete.

Nothing here imports torch: chunks are plain bytearrays, read with ``preadv`` straight into the buffers the
native kernel reads, and written from the buffers it fills (``engine`` picks torch only for what the kernel
does not cover).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from c2f_megatron.checkpoint import HF_SIDE_FILES, TOKENIZER_FILES
from c2f_megatron.checkpoint.atomic_dir import cleanup_on_failure, commit_output, prepare_output
from c2f_megatron.checkpoint.hf_dir import (
    INDEX_FILE,
    HFCheckpoint,
    PositionedReader,
    StreamedShardFile,
    open_hf_checkpoint,
)
from c2f_megatron.checkpoint.manifest import FileRecord
from c2f_megatron.merge import MergeError, check_outputs_free, provenance
from c2f_megatron.merge.engine import ITEMSIZE, BufferMerger
from c2f_megatron.merge.recipe import MergeRecipe

PROVENANCE_FILE = "c2f_merge.json"
# config.json fields that differ between identical architectures (who saved it, and the dtype label).
CONFIG_IGNORED = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")

DTYPE_TO_ST = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
ST_TO_HF_NAME = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
ST_TO_C2F = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp64"}
# Elements per read/merge/write step: 512 KiB per bf16 buffer, so a chunk is still in the L2 cache when the
# kernel reads it and when its output is written. Measured on the 2-core machine while another job loaded
# it (1B model, bf16, in-process merge, 12 interleaved runs, median): 256K elements 1.10 s, 512K 1.17 s,
# 1M 2.22 s; the kernel's CPU time is the same, the read()/write() system time grows with the chunk.
IO_CHUNK = 1 << 18
# Buffer sets in flight: chunks i+1..i+2 are read while chunk i is merged and chunk i-1 written. Two and
# four measured alike within the noise of shared cores; the third set (1.5 MiB) absorbs a stalled write.
PIPELINE_DEPTH = 3


def check_compatible(ckpts: Sequence[HFCheckpoint], labels: Sequence[str]) -> None:
    """Same config (less the fields in CONFIG_IGNORED), tensors, shapes, dtypes and tokenizer files."""
    ref, ref_label = ckpts[0], labels[0]
    for other, label in zip(ckpts[1:], labels[1:]):
        for key in sorted(set(ref.config) | set(other.config)):
            if key in CONFIG_IGNORED:
                continue
            va, vb = ref.config.get(key, "<absent>"), other.config.get(key, "<absent>")
            if va != vb:
                raise MergeError(
                    f"config.json field {key!r} differs: {va!r} in {ref_label} ({ref.path}) vs {vb!r} in "
                    f"{label} ({other.path}); the checkpoints are not the same architecture"
                )
        for name in ref.tensors:
            if name not in other.tensors:
                raise MergeError(
                    f"tensor {name!r} is in {ref_label} ({ref.path}) but not in {label} ({other.path})"
                )
        for name in other.tensors:
            if name not in ref.tensors:
                raise MergeError(
                    f"tensor {name!r} is in {label} ({other.path}) but not in {ref_label} ({ref.path})"
                )
        for name, ta in ref.tensors.items():
            tb = other.tensors[name]
            if ta.shape != tb.shape:
                raise MergeError(
                    f"tensor {name!r} has shape {list(ta.shape)} in {ref_label} and {list(tb.shape)} in {label}"
                )
            if ta.dtype != tb.dtype:
                raise MergeError(
                    f"tensor {name!r} has dtype {ta.dtype} in {ref_label} and {tb.dtype} in {label}"
                )
        for fname in TOKENIZER_FILES:
            fa, fb = ref.path / fname, other.path / fname
            if fa.is_file() != fb.is_file():
                have = ref_label if fa.is_file() else label
                raise MergeError(f"tokenizer file {fname} exists only in {have}; the tokenizers differ")
            if fa.is_file() and fa.read_bytes() != fb.read_bytes():
                raise MergeError(f"tokenizer file {fname} differs between {ref_label} and {label}")
    for name, t in ref.tensors.items():
        if t.dtype not in ITEMSIZE:
            raise MergeError(
                f"{t.file}: tensor {name!r} has dtype {t.dtype}; only float tensors can be merged"
            )


def merge_hf(
    inputs: Sequence[str | Path],
    roles: Sequence[str],
    recipes: Sequence[MergeRecipe],
    outs: Sequence[str | Path],
    dtype: str | None = None,
    force: bool = False,
    chunk: int | None = None,
    threads: int | None = 1,
    merger: BufferMerger | None = None,
) -> list[Path]:
    """Write ``outs[k] = recipes[k](inputs)`` for every tensor, reading the inputs once for all k.

    ``dtype`` ('fp32'|'bf16'|'fp16') sets the output dtype of every tensor; default each tensor's own.
    ``chunk``: elements per read/merge/write step (default ``IO_CHUNK``). ``threads``: torch intra-op
    threads while the torch fallback merges (restored after; ``None`` leaves torch's setting alone).
    ``merger``: the chunk evaluator (default a ``BufferMerger`` of ``recipes``; tests pass one to see which
    implementation ran).
    """
    if len(recipes) != len(outs):
        raise ValueError("one output directory per recipe")
    if dtype is not None and dtype not in DTYPE_TO_ST:
        raise MergeError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_TO_ST)}")
    ckpts = [open_hf_checkpoint(p, MergeError) for p in inputs]
    labels = [f"--{r}" if r in ("a", "b", "base") else r for r in roles]
    check_compatible(ckpts, labels)
    out_paths = [Path(o) for o in outs]
    check_outputs_free(out_paths, force)
    ref = ckpts[0]
    out_dt = {n: (DTYPE_TO_ST[dtype] if dtype else t.dtype) for n, t in ref.tensors.items()}
    dtype_label = dtype or "+".join(sorted({ST_TO_C2F[d] for d in out_dt.values()}))
    records = [provenance("hf", inputs, r, dtype_label, roles) for r in recipes]

    side = [ref.path / f for f in (*TOKENIZER_FILES, *HF_SIDE_FILES)]
    need = sum(t.numel * ITEMSIZE[out_dt[n]] for n, t in ref.tensors.items())
    need += sum(f.stat().st_size for f in side if f.is_file())
    merger = merger or BufferMerger(recipes, torch_threads=threads)
    what = str(out_paths[0]) if len(out_paths) == 1 else f"the {len(out_paths)} outputs"
    with cleanup_on_failure(out_paths, need * len(out_paths), what):
        tmps = [prepare_output(o, force=force) for o in out_paths]
        try:
            written = _stream(ckpts, tmps, records, merger, out_dt, chunk or IO_CHUNK)
            for tmp, rec in zip(tmps, records):
                _write_side_files(ref, tmp, dtype, out_dt, rec)
        finally:
            merger.close()
        return [commit_output(tmp, o, w) for tmp, o, w in zip(tmps, out_paths, written)]


@dataclass(frozen=True)
class _Chunk:
    """Elements ``start:start+n`` of one tensor (``last`` closes its shard)."""

    name: str
    start: int
    n: int
    last: bool


def _plan(
    ref: HFCheckpoint,
    tmps: Sequence[Path],
    records: Sequence[dict[str, Any]],
    out_dt: dict[str, str],
    chunk: int,
    written: list[list[FileRecord]],
) -> list[tuple[list[StreamedShardFile], _Chunk]]:
    """Open every output shard (header written) and list the chunks in file order with their writers
    (a shard without tensors is closed at once, its record added to ``written``)."""
    shard_chunks: list[tuple[list[StreamedShardFile], _Chunk]] = []
    for shard in ref.shards:
        entries = ref.shard_tensors(shard)
        writers = [
            StreamedShardFile(
                tmp / shard,
                [(t.name, out_dt[t.name], t.shape) for t in entries],
                {"format": "pt", "c2f_merge": json.dumps(rec, sort_keys=True)},
            )
            for tmp, rec in zip(tmps, records)
        ]
        chunks = [
            _Chunk(t.name, start, min(chunk, t.numel - start), False)
            for t in entries
            for start in range(0, max(t.numel, 1), chunk)
        ]
        if not chunks:  # a shard without tensors: header only
            for w, done in zip(writers, written):
                done.append(w.close())
            continue
        chunks[-1] = dataclasses.replace(chunks[-1], last=True)
        shard_chunks.extend((writers, c) for c in chunks)
    return shard_chunks


def _stream(
    ckpts: Sequence[HFCheckpoint],
    tmps: Sequence[Path],
    records: Sequence[dict[str, Any]],
    merger: BufferMerger,
    out_dt: dict[str, str],
    chunk: int,
    depth: int | None = None,
) -> list[list[FileRecord]]:
    """Read -> merge -> write every chunk, reads and writes in two helper threads (file I/O and the kernel
    release the GIL), so the arithmetic hides behind the I/O. ``depth`` buffer sets rotate: while chunk i is
    merged, chunks i+1..i+depth-1 are read and chunk i-1 is written (default ``PIPELINE_DEPTH``). Returns
    the manifest records of each output's shards."""
    depth = depth or PIPELINE_DEPTH
    ref = ckpts[0]
    in_size = max(ITEMSIZE[t.dtype] for t in ref.tensors.values())
    out_size = max(ITEMSIZE[d] for d in out_dt.values())
    slots = [
        ([bytearray(chunk * in_size) for _ in ckpts], [bytearray(chunk * out_size) for _ in tmps])
        for _ in range(depth)
    ]
    reader = PositionedReader(MergeError)

    def read(c: _Chunk, slot: int) -> None:
        for ckpt, buf in zip(ckpts, slots[slot][0]):
            src = ckpt.tensors[c.name]
            size = ITEMSIZE[src.dtype]
            reader.read_into(src.file, src.begin + c.start * size, buf, c.n * size)

    written: list[list[FileRecord]] = [[] for _ in tmps]

    def write(writers: list[StreamedShardFile], slot: int, nbytes: int, close: bool) -> None:
        for w, buf, done in zip(writers, slots[slot][1], written):
            w.write(memoryview(buf)[:nbytes])
            if close:
                done.append(w.close())

    shard_chunks = _plan(ref, tmps, records, out_dt, chunk, written)
    read_pool, write_pool = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    reads: dict[int, Future] = {}
    writes: list[Future | None] = [None] * depth
    try:
        for j in range(min(depth, len(shard_chunks))):
            reads[j] = read_pool.submit(read, shard_chunks[j][1], j)
        for i, (writers, c) in enumerate(shard_chunks):
            slot = i % depth
            reads.pop(i).result()
            pending = writes[slot]
            if pending is not None:
                pending.result()
            odt = out_dt[c.name]
            merger.merge(slots[slot][0], ref.tensors[c.name].dtype, slots[slot][1], odt, c.n)
            writes[slot] = write_pool.submit(write, writers, slot, c.n * ITEMSIZE[odt], c.last)
            if i + depth < len(shard_chunks):
                reads[i + depth] = read_pool.submit(read, shard_chunks[i + depth][1], slot)
        for f in writes:
            if f is not None:
                f.result()
        return written
    finally:
        read_pool.shutdown(wait=True, cancel_futures=True)
        write_pool.shutdown(wait=True, cancel_futures=True)
        reader.close()
        for writers, _ in shard_chunks:
            for w in writers:
                w.abandon()


def _write_side_files(
    ref: HFCheckpoint, tmp: Path, dtype: str | None, out_dt: dict[str, str], record: dict[str, Any]
) -> None:
    """config.json (dtype label updated), index, tokenizer files, provenance."""
    config = dict(ref.config)
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype":
                config[key] = ST_TO_HF_NAME[DTYPE_TO_ST[dtype]]
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if ref.index is not None:
        index = dict(ref.index)
        total = sum(t.numel * ITEMSIZE[out_dt[n]] for n, t in ref.tensors.items())
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for fname in (*TOKENIZER_FILES, *HF_SIDE_FILES):
        if (ref.path / fname).is_file():
            shutil.copyfile(ref.path / fname, tmp / fname)
    (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
