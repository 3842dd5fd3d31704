"""The manifest of a complete output directory: every file's size and CRC-32, written last, fsynced.

Every directory the project commits (``atomic_dir.commit_output``: c2f checkpoints, training steps, HF
directories from the converters and the merge) gets ``c2f_manifest.json`` as its last file. Writing it reads
each file back once (CRC-32 at ~2 GB/s per thread, in a thread pool, from the page cache) and fsyncs it, so
that the rename which publishes the directory happens only after its bytes are on disk.

``verify`` is the one check of a directory against its manifest: every listed file present, of the listed
size and (``checksums``) CRC. Loads check sizes (a stat per file), resume and ``c2f checkpoint verify``
check the CRCs too. A directory written before manifests existed gets a structural check instead (each
megatron distributed checkpoint in it has ``.metadata``, ``common.pt`` and ``metadata.json``).

A part of a checkpoint (``CKPT/model``, ``STEP/actor``) is verified against the manifest of the directory
that holds it. Writers that stream a file (the converters, the HF merge) write it through ``RecordingFile``
instead, which keeps the size and CRC-32 as the bytes go out and starts the kernel's writeback early, so
nothing is read back and the final fsync has little left to wait for. Torch-free.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_FILE = "c2f_manifest.json"
MANIFEST_FORMAT = "c2f-manifest"
MANIFEST_VERSION = 1
# The files of one megatron ``dist_checkpointing`` directory (torch_dist) without which it cannot load.
DIST_CHECKPOINT_FILES = ("metadata.json", ".metadata", "common.pt")
# Read size for checksums: one reused buffer per thread, so the memory stays flat whatever the file size.
_CHUNK = 4 << 20


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the manifest's directory, POSIX separators
    size: int
    crc32: str  # 8 hex digits

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "crc32": self.crc32}


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def list_files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` but the manifest, as sorted relative POSIX paths."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(directory):
        for name in filenames:
            rel = Path(dirpath, name).relative_to(directory).as_posix()
            if rel != MANIFEST_FILE:
                found.append(rel)
    return sorted(found)


def _crc32(path: Path, sync: bool) -> tuple[int, str]:
    crc, size = 0, 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
        if sync:
            os.fsync(f.fileno())
    return size, f"{crc & 0xFFFFFFFF:08x}"


def file_records(directory: Path, files: Iterable[str], sync: bool = True) -> list[FileRecord]:
    """Size and CRC-32 of ``files`` (relative to ``directory``), fsyncing each one when ``sync``."""
    files = list(files)

    def one(rel: str) -> FileRecord:
        size, crc = _crc32(directory / rel, sync)
        return FileRecord(rel, size, crc)

    if len(files) <= 1:
        return [one(rel) for rel in files]
    with ThreadPoolExecutor(min(_threads(), len(files))) as pool:
        return list(pool.map(one, files))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)`` and ``len(B)`` (zlib's
    ``crc32_combine``, which Python's zlib does not expose): ``crc1`` is advanced over ``len2`` zero bytes
    by the GF(2) operators for 2**k bytes, one per set bit of ``len2``."""
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _gf2_times(_zero_byte_operator(k), crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


_ZERO_OPERATORS: list[list[int]] = []  # [k]: the CRC-32 register after 2**k zero bytes, as a 32x32 matrix


def _zero_byte_operator(k: int) -> list[int]:
    if not _ZERO_OPERATORS:
        bit = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit (reflected polynomial)
        for _ in range(3):  # 2, 4, then 8 bits: one zero byte
            bit = [_gf2_times(bit, row) for row in bit]
        _ZERO_OPERATORS.append(bit)
    while len(_ZERO_OPERATORS) <= k:
        last = _ZERO_OPERATORS[-1]
        _ZERO_OPERATORS.append([_gf2_times(last, row) for row in last])
    return _ZERO_OPERATORS[k]


def _sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_WRITEBACK_EVERY = 32 << 20


class RecordingFile:
    """A new file written front to back, which keeps its size and CRC-32 (``record()`` after ``close()``:
    the manifest need not read it back) and asks the kernel to start writing each 32 MB out as soon as it
    is written (Linux ``sync_file_range``), so that ``close()``'s fsync finds little left to do."""

    def __init__(self, path: Path, relative: str) -> None:
        self.path, self.relative = path, relative
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        self.size = self.crc = self._flushed = 0

    def write(self, data: Any, crc: int | None = None) -> None:
        """Append ``data`` (any buffer); ``crc``: its CRC-32 when the caller has it already."""
        view = memoryview(data).cast("B")
        done = 0
        while done < view.nbytes:
            done += os.write(self.fd, view[done:])
        if crc is None:
            self.crc = zlib.crc32(view, self.crc)
        else:
            self.crc = crc32_combine(self.crc, crc, view.nbytes)
        self.size += view.nbytes
        if _SYNC_FILE_RANGE is not None and self.size - self._flushed >= _WRITEBACK_EVERY:
            _SYNC_FILE_RANGE(self.fd, self._flushed, self.size - self._flushed, _SYNC_FILE_RANGE_WRITE)
            self._flushed = self.size

    def close(self) -> FileRecord:
        """fsync, close and return the file's manifest record."""
        os.fsync(self.fd)
        self.abandon()
        return self.record()

    def record(self) -> FileRecord:
        return FileRecord(self.relative, self.size, f"{self.crc & 0xFFFFFFFF:08x}")

    def abandon(self) -> None:
        """Close without syncing (an error stopped the writing; the ``.partial`` directory is removed)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, records: Sequence[FileRecord] | None = None) -> Path:
    """Write ``directory/c2f_manifest.json`` (computing the records when not given), fsync it and every
    directory under ``directory``."""
    if records is None:
        records = file_records(directory, list_files(directory))
    records = sorted(records, key=lambda r: r.path)
    data = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "total_bytes": sum(r.size for r in records),
        "files": [r.to_json() for r in records],
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_FILE}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / MANIFEST_FILE)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for dirpath, _dirnames, _filenames in os.walk(directory, topdown=False):
        fsync_dir(Path(dirpath))
    return directory / MANIFEST_FILE


class ManifestError(ValueError):
    """A manifest that cannot be read."""


def read_manifest(directory: Path) -> list[FileRecord]:
    path = directory / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: field 'format' is not {MANIFEST_FORMAT!r}")
    if data.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{path}: field 'version' is {data.get('version')!r}, this code reads 1")
    try:
        return [FileRecord(str(e["path"]), int(e["size"]), str(e["crc32"])) for e in data["files"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: field 'files' malformed ({exc!r})") from None


def manifest_total_bytes(directory: Path) -> int | None:
    """The bytes a committed directory holds, from its manifest (None without a readable one)."""
    try:
        return sum(r.size for r in read_manifest(directory))
    except ManifestError:
        return None


def find_manifest(path: Path) -> tuple[Path, str] | None:
    """The directory whose manifest covers ``path`` (itself or up to two levels up, when that manifest
    lists files under it), and ``path``'s prefix inside it."""
    path = Path(path)
    for base in (path, path.parent, path.parent.parent):
        if (base / MANIFEST_FILE).is_file():
            prefix = path.relative_to(base).as_posix()
            prefix = "" if prefix == "." else prefix + "/"
            if not prefix:
                return base, prefix
            try:
                if any(r.path.startswith(prefix) for r in read_manifest(base)):
                    return base, prefix
            except ManifestError:
                return base, prefix  # reported by verify
    return None


def verify(path: Path, checksums: bool = True, part: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with ``path`` against the manifest that covers it, one line per problem (empty: OK).

    Without a manifest, the structural check of the module docstring. ``part=(i, n)`` checks every n-th
    file from the i-th (rank i's slice of a verification shared by n ranks)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: directory not found"]
    found = find_manifest(path)
    if found is None:
        return structural_problems(path) if part[0] == 0 else []
    base, prefix = found
    try:
        records = read_manifest(base)
    except ManifestError as exc:
        return [str(exc)]
    problems = []
    mine = [r for r in records if r.path.startswith(prefix)][part[0] :: part[1]]
    for record in mine:
        file = base / record.path
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            problems.append(f"{file}: missing (listed in {base / MANIFEST_FILE})")
            continue
        if size != record.size:
            problems.append(
                f"{file}: {size} bytes, the manifest records {record.size} (truncated or replaced)"
            )
    if checksums and not problems:
        for record, actual in zip(mine, file_records(base, [r.path for r in mine], sync=False)):
            if actual.crc32 != record.crc32:
                problems.append(
                    f"{base / record.path}: CRC-32 {actual.crc32}, the manifest records {record.crc32} (corrupted)"
                )
    return problems


def structural_problems(path: Path) -> list[str]:
    """For a directory without a manifest: each distributed checkpoint under it must hold its index files."""
    problems = []
    for dirpath, _dirnames, filenames in os.walk(path):
        names = set(filenames)
        if "metadata.json" in names or any(n.endswith(".distcp") for n in names):
            for required in DIST_CHECKPOINT_FILES:
                if required not in names:
                    problems.append(
                        f"{Path(dirpath) / required}: missing (distributed checkpoint incomplete)"
                    )
    return problems
