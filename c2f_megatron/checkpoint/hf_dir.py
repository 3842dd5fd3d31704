"""A Hugging Face safetensors directory: the one reader (and shard writer) the converters and the merge use.

Reading touches only ``config.json``, the index and every shard's header (8-byte length, JSON with dtype,
shape and byte offsets): nothing is loaded, so a 7B directory opens in milliseconds, and every tensor's
location is known for streaming reads. The module imports no torch (the HF merge never does);
``HFCheckpoint.read`` and ``ShardWriter`` import safetensors' torch side only when called.

Errors name the file and the field or tensor; callers choose the error class (the converters'
``ConversionError``, the merge's ``MergeError``), so each command reports in its own terms.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from c2f_megatron.checkpoint import manifest

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Bytes per element of every safetensors dtype.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: ``file`` from byte ``begin`` (absolute), ``nbytes`` long."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class HFCheckpoint:
    """An HF safetensors directory: its config, its shard files in order, and every tensor's location."""

    path: Path
    config: dict[str, Any]
    shards: list[str]
    tensors: dict[str, TensorEntry]
    index: dict[str, Any] | None

    def shard_tensors(self, shard: str) -> list[TensorEntry]:
        """The tensors of one shard in file order (so reading is sequential)."""
        return sorted((t for t in self.tensors.values() if t.file.name == shard), key=lambda t: t.begin)

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None):
        """One tensor (or a row/column block of it) as a torch tensor, through ``safe_open`` slices; the
        file is opened per read so its memory map (and the pages it touched) is released at once."""
        from safetensors import safe_open

        with safe_open(str(self.tensors[name].file), framework="pt") as f:
            part = f.get_slice(name)
            if rows is not None:
                return part[rows[0] : rows[1]]
            if cols is not None:
                return part[:, cols[0] : cols[1]]
            return part[:]


def is_hf_directory(path: str | Path) -> bool:
    """A directory with ``config.json`` and safetensors weights that is not a c2f megatron checkpoint."""
    from c2f_megatron.checkpoint import METADATA_FILE

    path = Path(path)
    return (
        (path / "config.json").is_file()
        and not (path / METADATA_FILE).is_file()
        and ((path / INDEX_FILE).is_file() or any(path.glob("*.safetensors")))
    )


def read_json(path: Path, error: type[Exception]) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise error(f"{path}: file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc


def read_hf_config(path: str | Path, error: type[Exception]) -> dict[str, Any]:
    """``config.json`` of an HF directory as a dict."""
    path = Path(path)
    if not path.is_dir():
        raise error(f"{path}: HF checkpoint directory not found")
    if not (path / "config.json").is_file():
        raise error(f"{path / 'config.json'}: missing; an HF checkpoint needs config.json")
    config = read_json(path / "config.json", error)
    if not isinstance(config, dict):
        raise error(f"{path / 'config.json'}: top level must be an object")
    return config


def read_safetensors_header(path: Path, error: type[Exception]) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts; validated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise error(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _MAX_HEADER:
            raise error(f"{path}: not a safetensors file (header length {n} invalid)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise error(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise error(f"{path}: corrupt safetensors header (not an object)")
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape = [int(d) for d in info["shape"]]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError) as exc:
            raise error(f"{path}: tensor {name!r}: malformed header entry {info!r}") from exc
        if data_start + end > size or begin > end:
            raise error(f"{path}: tensor {name!r}: data offsets {begin}..{end} beyond the file (truncated?)")
        numel = 1
        for d in shape:
            numel *= d
        if dtype in DTYPE_BYTES and end - begin != numel * DTYPE_BYTES[dtype]:
            raise error(f"{path}: tensor {name!r}: {end - begin} bytes for shape {shape} {dtype}")
    return header, data_start


def open_hf_checkpoint(path: str | Path, error: type[Exception]) -> HFCheckpoint:
    """Read config.json, the index (if sharded) and every shard header; nothing is loaded."""
    path = Path(path)
    problems = manifest.verify(path, checksums=False) if (path / manifest.MANIFEST_FILE).is_file() else []
    if problems:
        raise error(problems[0])
    config = read_hf_config(path, error)
    index = None
    if (path / INDEX_FILE).is_file():
        index = read_json(path / INDEX_FILE, error)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise error(f"{path / INDEX_FILE}: field 'weight_map' missing or empty")
        shards = list(dict.fromkeys(weight_map.values()))
    else:
        weight_map, shards = None, sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are not read; save with safetensors)"
        raise error(f"{path}: no *.safetensors files" + (hint if pickles else ""))
    tensors: dict[str, TensorEntry] = {}
    for shard in shards:
        file = path / shard
        if not file.is_file():
            raise error(f"{path / INDEX_FILE}: shard {shard!r} listed but missing")
        header, data_start = read_safetensors_header(file, error)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise error(f"{file}: tensor {name!r} also in {tensors[name].file.name}")
            begin, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            tensors[name] = TensorEntry(name, file, info["dtype"], shape, data_start + begin, end - begin)
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors or tensors[name].file.name != shard:
                raise error(
                    f"{path / INDEX_FILE}: weight_map[{name!r}] = {shard!r} but the tensor is not there"
                )
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise error(f"{path / INDEX_FILE}: tensor {extra[0]!r} is in a shard but not in weight_map")
    return HFCheckpoint(path, config, shards, tensors, index)


# ----------------------------------------------------------------------------------------------- writing


def parse_size(text: str | int, error: type[Exception]) -> int:
    """Bytes from ``5GB`` / ``500MB`` / ``123`` (decimal units, as in transformers)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not match:
        raise error(f"--max-shard-size {text!r}: use bytes or a size like 2GB / 500MB")
    unit = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}
    return int(float(match.group(1)) * unit[match.group(2)])


class ShardWriter:
    """Streams named torch tensors into safetensors files of at most ``max_bytes`` (a tensor is never
    split), named ``<prefix>-<n>.safetensors`` until ``name_shards`` gives them HF's names."""

    def __init__(self, directory: Path, prefix: str, max_bytes: int) -> None:
        self.directory, self.prefix, self.max_bytes = directory, prefix, max_bytes
        self.pending: dict[str, Any] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str], int]] = []  # (file name, tensor names, bytes)

    def add(self, name: str, tensor: Any) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        file_name = f"{self.prefix}-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(self.directory / file_name), metadata={"format": "pt"})
        self.written.append((file_name, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0


def shard_file_names(total: int) -> list[str]:
    """HF's names for ``total`` safetensors shards (``model.safetensors`` alone)."""
    if total == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]


def write_shard_index(directory: Path, shards: Sequence[tuple[str, Sequence[str], int]]) -> None:
    """``model.safetensors.index.json`` for shards ``(file name, tensor names, bytes)``, when there are
    several."""
    if len(shards) < 2:
        return
    weight_map = {n: file for file, names, _ in shards for n in names}
    index = {
        "metadata": {"total_size": sum(s[2] for s in shards)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))


def name_shards(directory: Path, written: list[tuple[str, list[str], int]]) -> None:
    """Rename ``ShardWriter`` parts (in the given order) to ``model-0000i-of-0000n.safetensors`` (or
    ``model.safetensors`` alone) and write the index when there is more than one."""
    finals = shard_file_names(len(written))
    for (part_name, _, _), final in zip(written, finals):
        os.replace(directory / part_name, directory / final)
    write_shard_index(directory, [(f, names, n) for f, (_, names, n) in zip(finals, written)])


class StreamedShardFile:
    """Writes one safetensors file whose header (names, dtypes, shapes, offsets) is known up front, so the
    data can be appended chunk by chunk in header order (through ``manifest.RecordingFile``: size and
    CRC-32 kept on the way, writeback started early)."""

    def __init__(
        self, path: Path, entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
    ):
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in entries:
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * DTYPE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
        self.path = path
        self.expected = offset
        self.written = 0
        self._f = manifest.RecordingFile(path, path.name)
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, data: memoryview, crc: int | None = None) -> None:
        self._f.write(data, crc)
        self.written += data.nbytes

    def close(self) -> manifest.FileRecord:
        """fsync and close; the file's manifest record."""
        if self.written != self.expected:
            self._f.abandon()
            raise RuntimeError(
                f"{self.path}: wrote {self.written} bytes of data, header says {self.expected}"
            )
        return self._f.close()

    def abandon(self) -> None:
        """Close the file if an error stopped the writing (its ``.partial`` directory stays incomplete)."""
        self._f.abandon()


class PositionedReader:
    """Positioned reads (``preadv``: no seek, no intermediate copy) into reused buffers, one fd per shard."""

    def __init__(self, error: type[Exception]) -> None:
        self.error = error
        self._fds: dict[Path, int] = {}

    def fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return fd

    def read_into(self, file: Path, offset: int, buf: bytearray | memoryview, nbytes: int) -> None:
        fd = self.fd(file)
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [view[got:nbytes]], offset + got)
            else:  # macOS before Python 3.12: seek + read (one reader thread owns the fd)
                os.lseek(fd, offset + got, os.SEEK_SET)
                n = os.readv(fd, [view[got:nbytes]])
            if not n:
                raise self.error(f"{file}: unexpected end of file at byte {offset + got} (truncated?)")
            got += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
