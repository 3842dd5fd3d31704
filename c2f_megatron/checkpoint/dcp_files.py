"""megatron's ``torch_dist`` checkpoint part at the file level, for the streaming converters.

A ``model/`` part is a ``torch.distributed.checkpoint`` directory: ``.metadata`` (a pickled ``Metadata``: the
global shape and dtype of every tensor, its chunks, and where each chunk lies: file, byte offset, length),
``__<rank>_<n>.distcp`` files holding one ``torch.save`` archive per chunk, plus megatron's ``metadata.json``
and ``common.pt``. megatron's loader reads any chunking of a global tensor at any TP/PP, so the converters
write and read these files directly, one layer at a time, instead of building the model.

Reading imports no torch: ``.metadata`` is unpickled into plain stand-ins (only the classes a dcp index
names are accepted, so a crafted file cannot run code), and a chunk's raw bytes are located inside its
archive (an uncompressed zip) by parsing the zip headers and the archive's tensor pickle, which must
describe one contiguous tensor of the chunk's shape. Writing imports no torch either (see below).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from c2f_megatron.checkpoint import CheckpointError, manifest

DCP_INDEX = ".metadata"
MEGATRON_METADATA = "metadata.json"
COMMON_FILE = "common.pt"
# What megatron's dist_checkpointing.save writes into metadata.json for the torch_dist backend.
TORCH_DIST_BACKEND = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
# torch dtype names (as pickled) <-> safetensors dtype names.
TORCH_TO_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a global tensor: its box (``offsets``, ``sizes``) and its archive's place."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    begin: int
    length: int


@dataclass
class TensorInfo:
    key: str
    dtype: str  # safetensors name (BF16, F32, ...)
    shape: tuple[int, ...]
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class DcpIndex:
    directory: Path
    tensors: dict[str, TensorInfo]
    objects: dict[str, tuple[str, int, int]]  # ShardedObject key -> (file, begin, length)


# ------------------------------------------------------------------------------------------- reading


class _Stub:
    """Stand-in for a dcp metadata class: keeps what unpickling gives it (attributes or a state tuple)."""

    state: Any = None

    def __init__(self, *args: Any) -> None:
        self.state = args[0] if len(args) == 1 else args  # enums are rebuilt from their value

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def _key(self) -> tuple[Any, Any]:
        return self.__dict__.get("fqn"), self.__dict__.get("offset")

    def __hash__(self) -> int:  # MetadataIndex keys of storage_data (fqn and offset, as torch hashes them)
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Stub) and self._key() == other._key()


_STUB_TYPES: dict[tuple[str, str], type] = {}
_BUILTINS = {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list, "dict": dict, "slice": slice}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a dcp ``.metadata`` into stand-ins: dcp's own classes, torch dtypes/sizes/layouts and plain
    containers are accepted, anything else is refused naming it."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            return _STUB_TYPES.setdefault((module, name), type(name, (_Stub,), {}))
        if module == "torch" and name == "Size":
            return tuple
        if module == "torch" and (name in TORCH_TO_ST or name in _OTHER_TORCH_NAMES):
            return name  # a dtype or layout, kept by name
        if module == "torch.serialization" and name == "_get_layout":
            return str
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "builtins" and name in _BUILTINS:
            return _BUILTINS[name]
        raise pickle.UnpicklingError(f"it names {module}.{name}")


# dtypes a dcp index may mention besides the float ones (we only convert float tensors), and the layout
_OTHER_TORCH_NAMES = {
    "strided", "int64", "int32", "int16", "int8", "uint8", "bool", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64",
}  # fmt: skip


def read_index(directory: str | Path) -> DcpIndex:
    """The tensors (global shape, dtype, chunks with their locations) and objects of a dcp directory."""
    directory = Path(directory)
    path = directory / DCP_INDEX
    try:
        with open(path, "rb") as f:
            meta = _IndexUnpickler(f).load()
        sdm, storage = meta.state_dict_metadata, meta.storage_data
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (distributed checkpoint incomplete)") from None
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(
            f"{path}: not a plain distributed-checkpoint index ({reason}); refused"
        ) from None
    places: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
    for index, info in storage.items():
        offset = getattr(index, "offset", None)  # omitted when None
        offset = None if offset is None else tuple(offset)
        places[(index.fqn, offset)] = (info.relative_path, int(info.offset), int(info.length))
    tensors: dict[str, TensorInfo] = {}
    objects: dict[str, tuple[str, int, int]] = {}
    for key, entry in sdm.items():
        if not hasattr(entry, "chunks"):  # BytesStorageMetadata: a ShardedObject
            if (key, None) in places:
                objects[key] = places[(key, None)]
            continue
        dtype = entry.properties.state[0] if entry.properties.state else None
        info = TensorInfo(key, TORCH_TO_ST.get(str(dtype), str(dtype)), tuple(entry.size))
        for c in entry.chunks:
            offsets = tuple(c.offsets)
            where = places.get((key, offsets))
            if where is None:
                raise CheckpointError(f"{path}: tensor {key!r} chunk at {list(offsets)} has no storage entry")
            info.chunks.append(Chunk(offsets, tuple(c.sizes), *where))
        tensors[key] = info
    return DcpIndex(directory, tensors, objects)


class _Window(io.RawIOBase):
    """Bytes ``begin:begin+length`` of an open file, as a seekable file (for ``zipfile``)."""

    def __init__(self, fd: int, begin: int, length: int) -> None:
        self.fd, self.begin, self.length, self.pos = fd, begin, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), self.length - self.pos))
        got = os.preadv(self.fd, [memoryview(buf)[:n]], self.begin + self.pos) if n else 0
        self.pos += got
        return got


def _rebuild(storage: Any, storage_offset: int, size: Any, stride: Any, *_: Any) -> dict[str, Any]:
    return {"storage": storage, "offset": storage_offset, "size": tuple(size), "stride": tuple(stride)}


class _TensorPickle(pickle.Unpickler):
    """The tensor description inside a ``torch.save`` archive (``_rebuild_tensor_v2`` arguments)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild
        if module == "torch" and (name.endswith("Storage") or name in TORCH_TO_ST):
            return name
        if module == "collections" and name == "OrderedDict":
            return dict
        raise pickle.UnpicklingError(f"it names {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return tuple(pid)  # ('storage', storage type, key, location, numel)


def chunk_data_offset(fd: int, chunk: Chunk, itemsize: int, where: str) -> int:
    """Absolute file offset of a chunk's raw tensor bytes, after checking that its archive holds exactly
    one contiguous, uncompressed little-endian tensor of the chunk's shape."""
    numel = 1
    for d in chunk.sizes:
        numel *= d
    try:
        with zipfile.ZipFile(io.BufferedReader(_Window(fd, chunk.begin, chunk.length))) as zf:
            infos = {i.filename.split("/", 1)[-1]: i for i in zf.infolist()}
            described = _TensorPickle(io.BytesIO(zf.read(infos["data.pkl"]))).load()
            order = zf.read(infos["byteorder"]).decode() if "byteorder" in infos else "little"
    except (KeyError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a plain tensor archive ({exc})") from None
    storages = [n for n in infos if n.startswith("data/")]
    strides, acc = [], 1
    for d in reversed(chunk.sizes):
        strides.append(acc)
        acc *= d
    if not (
        isinstance(described, dict)
        and storages == [f"data/{described['storage'][2]}"]
        and described["offset"] == 0
        and described["size"] == chunk.sizes
        and (numel <= 1 or described["stride"] == tuple(reversed(strides)))
        and order == "little"
    ):
        raise CheckpointError(
            f"{where}: the archive is not one contiguous tensor of shape {list(chunk.sizes)}"
        )
    info = infos[storages[0]]
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != numel * itemsize:
        raise CheckpointError(f"{where}: tensor data is {info.file_size} bytes, expected {numel * itemsize}")
    local = os.pread(fd, 30, chunk.begin + info.header_offset)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{where}: corrupt tensor archive (bad zip local header)")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return chunk.begin + info.header_offset + 30 + name_len + extra_len


# ------------------------------------------------------------------------------------------- writing
#
# The files are written as torch writes them, without torch: each chunk is the uncompressed zip archive
# ``torch.save`` makes of one tensor (its records in torch's order, every record's data aligned to 64 bytes,
# the tensor pickle byte for byte torch's), and ``.metadata`` is the pickle of dcp's ``Metadata`` (the
# classes named by module and name, never imported). ``tests/test_convert_streaming.py`` compares both
# with what torch itself writes.

_ALIGN = 64
_ZIP_DATE = (1 << 5) | 1  # 1980-01-01, as torch's writer leaves it
_FB_EXTRA = 0x4246  # the "FB" padding field torch's writer aligns record data with
_ZIP32_LIMIT = 0xFFFFFFFF - (1 << 20)  # archives past this need zip64: written by torch instead
TORCH_STORAGE = {
    "F32": "FloatStorage",
    "BF16": "BFloat16Storage",
    "F16": "HalfStorage",
    "F64": "DoubleStorage",
}


def _pickle_int(n: int) -> bytes:
    if 0 <= n < 1 << 8:
        return b"K" + bytes([n])
    if 0 <= n < 1 << 16:
        return b"M" + struct.pack("<H", n)
    if -(1 << 31) <= n < 1 << 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _pickle_int_tuple(values: tuple[int, ...]) -> bytes:
    body = b"".join(_pickle_int(v) for v in values)
    return (
        body + b"\x85\x86\x87"[len(values) - 1 : len(values)] if 1 <= len(values) <= 3 else b"(" + body + b"t"
    )


def tensor_pickle(st_dtype: str, sizes: tuple[int, ...]) -> bytes:
    """``data.pkl`` of ``torch.save(tensor)`` for a contiguous CPU tensor of ``sizes`` (at least 1-d)."""
    if not sizes:
        raise ValueError("0-dim tensors are not written by the converters")
    numel, strides = 1, []
    for d in reversed(sizes):
        strides.append(numel)
        numel *= d
    return (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00((X\x07\x00\x00\x00storageq\x01ctorch\n"
        + TORCH_STORAGE[st_dtype].encode()
        + b"\nq\x02X\x01\x00\x00\x000q\x03X\x03\x00\x00\x00cpuq\x04"
        + _pickle_int(numel)
        + b"tq\x05QK\x00"
        + _pickle_int_tuple(tuple(sizes))
        + b"q\x06"
        + _pickle_int_tuple(tuple(reversed(strides)))
        + b"q\x07\x89ccollections\nOrderedDict\nq\x08)Rq\ttq\nRq\x0b."
    )


class _ZipArchive:
    """The records of one uncompressed zip archive laid out as torch's writer lays them out."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.size = 0
        self.central: list[bytes] = []

    def local(self, name: str, crc: int, nbytes: int) -> bytes:
        """The local header of the next record (its data is written right after it)."""
        raw = f"{self.prefix}/{name}".encode()
        pad = -(self.size + 30 + len(raw)) % _ALIGN
        if 0 < pad < 4:  # the padding field needs room for its own 4-byte header
            pad += _ALIGN
        extra = struct.pack("<HH", _FB_EXTRA, pad - 4) + b"Z" * (pad - 4) if pad else b""
        fields = (0, 0, 0, 0, _ZIP_DATE, crc & 0xFFFFFFFF, nbytes, nbytes, len(raw))
        head = struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields, len(extra)) + raw + extra
        self.central.append(
            struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 0, *fields, 0, 0, 0, 0, 0, self.size) + raw
        )
        self.size += len(head) + nbytes
        return head

    def record(self, name: str, data: bytes) -> bytes:
        return self.local(name, zlib.crc32(data), len(data)) + data

    def end(self) -> bytes:
        directory = b"".join(self.central)
        n = len(self.central)
        return directory + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(directory), self.size, 0)


def _serialization_id() -> bytes:
    return f"{uuid.uuid4().int:040d}"[-40:].encode()


def _archive_start(zf: _ZipArchive, pickled: bytes) -> bytes:
    return (
        zf.record("data.pkl", pickled)
        + zf.record(".format_version", b"1")
        + zf.record(".storage_alignment", str(_ALIGN).encode())
        + zf.record("byteorder", b"little")
    )


def _archive_finish(zf: _ZipArchive) -> bytes:
    tail = zf.record("version", b"3\n") + zf.record(".data/serialization_id", _serialization_id())
    return tail + zf.end()


def pickle_archive(value: Any, prefix: str = "archive") -> bytes:
    """The archive ``torch.save(value)`` writes for a value that holds no tensors (plain Python data)."""
    zf = _ZipArchive(prefix)
    start = _archive_start(zf, pickle.dumps(value, protocol=2))
    return start + _archive_finish(zf)


def tensor_archive(st_dtype: str, sizes: tuple[int, ...], nbytes: int, crc: int) -> tuple[bytes, bytes]:
    """(bytes before, bytes after) the raw data of the archive ``torch.save`` writes for one contiguous
    little-endian tensor whose data is ``nbytes`` long with CRC-32 ``crc``."""
    if nbytes > _ZIP32_LIMIT:
        raise ValueError(f"tensor of {nbytes} bytes needs a zip64 archive")
    zf = _ZipArchive("archive")
    head = _archive_start(zf, tensor_pickle(st_dtype, sizes)) + zf.local("data/0", crc, nbytes)
    return head, _archive_finish(zf)


class ChunkFileWriter:
    """Appends one tensor archive per chunk to one ``.distcp`` file and records where each lies."""

    def __init__(self, path: Path, relative: str) -> None:
        self.name = path.name
        self.file = manifest.RecordingFile(path, relative)
        self.tensors: list[tuple[str, tuple[int, ...], tuple[int, ...], int, int]] = []
        self.objects: list[tuple[str, int, int]] = []

    def tensor(
        self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], st_dtype: str, data: Any, crc: int
    ) -> None:
        """Append the archive of one chunk; ``data``: its raw bytes (C order), ``crc``: their CRC-32."""
        begin = self.file.size
        nbytes = memoryview(data).nbytes
        if nbytes > _ZIP32_LIMIT:  # a > 4 GB chunk (a 400B-class embedding): torch's zip64 writer
            import torch

            buf = io.BytesIO()
            flat = torch.frombuffer(data, dtype=getattr(torch, ST_TO_TORCH[st_dtype]))
            torch.save(flat.view(sizes), buf)
            self.file.write(buf.getbuffer())
        else:
            head, tail = tensor_archive(st_dtype, sizes, nbytes, crc)
            self.file.write(head)
            self.file.write(data, crc)
            self.file.write(tail)
        self.tensors.append((key, offsets, tuple(sizes), begin, self.file.size - begin))

    def object(self, key: str, payload: bytes) -> None:
        begin = self.file.size
        self.file.write(payload)
        self.objects.append((key, begin, len(payload)))

    def close(self) -> manifest.FileRecord:
        return self.file.close()

    def abandon(self) -> None:
        self.file.abandon()

    def records(self) -> dict[str, Any]:
        return {"file": self.name, "tensors": self.tensors, "objects": self.objects}


def object_payload(value: Any) -> bytes:
    """A ShardedObject's bytes as megatron stores them (``torch.save`` of a list of the object's data, as
    its ``_mcore_to_torch_sharded_object`` does); ``value`` holds no tensors."""
    return pickle_archive([value])


class _Global:
    """A module-level name a pickle refers to (a class, function or dtype), never imported."""

    def __init__(self, module: str, name: str) -> None:
        self.ref = f"{module}\n{name}\n".encode()


class _New:
    """An instance pickled as ``cls.__new__(cls)`` plus ``BUILD(state)`` (how a dataclass pickles)."""

    def __init__(self, cls: _Global, state: Any) -> None:
        self.cls, self.state = cls, state


class _Call:
    """A value pickled as ``REDUCE(func, args)`` (``torch.Size``, a layout, an enum member)."""

    def __init__(self, func: _Global, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args


class _IndexPickler(pickle._Pickler):  # the Python pickler: ``save`` can be extended
    """Writes the stand-ins above as the opcodes pickle writes for the real objects."""

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if not isinstance(obj, (_Global, _New, _Call)):
            super().save(obj, save_persistent_id)
            return
        seen = self.memo.get(id(obj))
        if seen is not None:
            self.write(self.get(seen[0]))
        elif isinstance(obj, _Global):
            self.write(pickle.GLOBAL + obj.ref)
            self.memoize(obj)
        elif isinstance(obj, _New):
            self.save(obj.cls)
            self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
            self.memoize(obj)
            if obj.state is not None:  # None: no state to set (a dataclass without fields)
                self.save(obj.state)
                self.write(pickle.BUILD)
        else:
            self.save(obj.func)
            self.save(obj.args)
            self.write(pickle.REDUCE)
            self.memoize(obj)


_DCP_META = "torch.distributed.checkpoint.metadata"
_G = {
    name: _Global(_DCP_META, name)
    for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
}  # fmt: skip
_G["_StorageInfo"] = _Global("torch.distributed.checkpoint.filesystem", "_StorageInfo")
_G["Size"] = _Global("torch", "Size")
_G["_get_layout"] = _Global("torch.serialization", "_get_layout")
DCP_VERSION = "1.0.0"  # torch's CURRENT_DCP_VERSION
# one object each, as torch.strided and the enum member are (pickled once, then referenced)
_STRIDED = _Call(_G["_get_layout"], ("torch.strided",))
_CONTIGUOUS = _Call(_G["_MEM_FORMAT_ENCODING"], (0,))  # TORCH_CONTIGUOUS_FORMAT


def _size(values: tuple[int, ...]) -> _Call:
    return _Call(_G["Size"], (tuple(list(values)),))  # a fresh tuple, as torch.Size.__reduce__ gives


def index_pickle(
    shapes: dict[str, tuple[tuple[int, ...], str]], records: list[dict[str, Any]], checkpoint_id: str
) -> bytes:
    """The pickled dcp ``Metadata`` for the chunks of ``records`` (``ChunkFileWriter.records`` of every
    file); ``shapes``: key -> (global shape, torch dtype name). Every chunk of a tensor must be there, and
    the chunks must tile it exactly."""
    dtypes = {name: _Global("torch", name) for _, name in shapes.values()}
    sdm: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    covered: dict[str, int] = {}
    for rec in records:
        for key, offsets, sizes, begin, length in rec["tensors"]:
            shape, dtype = shapes[key]
            if key not in sdm:
                properties = (dtypes[dtype], _STRIDED, False, _CONTIGUOUS, False)
                chunks: list[Any] = []
                state = {"properties": _New(_G["TensorProperties"], properties), "size": _size(shape)}
                sdm[key] = _New(_G["TensorStorageMetadata"], {**state, "chunks": chunks})
            sdm[key].state["chunks"].append(
                _New(_G["ChunkStorageMetadata"], {"offsets": _size(offsets), "sizes": _size(sizes)})
            )
            index = _New(_G["MetadataIndex"], {"fqn": key, "index": None, "offset": _size(offsets)})
            storage[index] = _storage_info(rec["file"], begin, length)
            n = 1
            for d in sizes:
                n *= d
            covered[key] = covered.get(key, 0) + n
        for key, begin, length in rec["objects"]:
            sdm[key] = _New(_G["BytesStorageMetadata"], None)
            index = _New(_G["MetadataIndex"], {"fqn": key, "index": None})  # no offset: not stored
            storage[index] = _storage_info(rec["file"], begin, length)
    for key, (shape, _) in shapes.items():
        total = 1
        for d in shape:
            total *= d
        if covered.get(key) != total:
            raise RuntimeError(
                f"internal: tensor {key!r}: chunks cover {covered.get(key, 0)} of {total} elements"
            )
    meta = _New(
        _G["Metadata"],
        {
            "state_dict_metadata": sdm,
            "planner_data": None,
            "storage_data": storage,
            "storage_meta": _New(
                _G["StorageMeta"],
                {
                    "checkpoint_id": checkpoint_id,
                    "save_id": str(uuid.uuid4()),
                    "load_id": None,
                    "modules": [],
                },
            ),
            "version": DCP_VERSION,
        },
    )
    buf = io.BytesIO()
    _IndexPickler(buf, protocol=2).dump(meta)
    return buf.getvalue()


def _storage_info(file: str, begin: int, length: int) -> _New:
    return _New(_G["_StorageInfo"], {"relative_path": file, "offset": begin, "length": length})


def write_index(
    directory: Path,
    shapes: dict[str, tuple[tuple[int, ...], str]],
    records: list[dict[str, Any]],
) -> list[manifest.FileRecord]:
    """Write ``.metadata`` (``index_pickle``), ``metadata.json`` and an empty ``common.pt`` into a dcp
    directory whose chunk files are written; returns their manifest records (relative to its parent)."""
    files = {
        DCP_INDEX: index_pickle(shapes, records, str(directory)),
        MEGATRON_METADATA: json.dumps(TORCH_DIST_BACKEND).encode(),
        COMMON_FILE: pickle_archive({}, prefix="common"),
    }
    written = []
    for name, data in files.items():
        f = manifest.RecordingFile(directory / name, f"{directory.name}/{name}")
        try:
            f.write(data)
        except BaseException:
            f.abandon()
            raise
        written.append(f.close())
    return written


def is_plain_pickle_archive(path: Path) -> bool:
    """Whether ``path`` is a ``torch.save`` archive of plain Python data only (no class, function or
    tensor: nothing a load could run), decided without torch; False when unsure."""

    class Plain(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise pickle.UnpicklingError(f"it names {module}.{name}")

        def persistent_load(self, pid: Any) -> Any:
            raise pickle.UnpicklingError("it holds a storage")

    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl")]
            if len(names) != 1:
                return False
            Plain(io.BytesIO(zf.read(names[0]))).load()
    except Exception:
        return False
    return True
