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
that holds it. Torch-free.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MANIFEST_FILE = "c2f_manifest.json"
MANIFEST_FORMAT = "c2f-manifest"
MANIFEST_VERSION = 1
# The files of one megatron ``dist_checkpointing`` directory (torch_dist) without which it cannot load.
DIST_CHECKPOINT_FILES = ("metadata.json", ".metadata", "common.pt")
_CHUNK = 16 << 20


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
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
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
