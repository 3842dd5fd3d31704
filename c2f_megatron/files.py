"""Small files written whole or not at all, and data files read with errors naming file and line.

``write_atomic`` is every text file a job writes beside its checkpoints (reports, summaries, markers, the
list of skipped records, checkpoint metadata): a temp file in the same directory, renamed over the target,
so a reader never sees half a file. Torch-free (like ``config``, a module every floor may import), so a
report or an HF-mode merge that uses it never pays for torch.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class DataFileError(OSError, ValueError):
    """A data file that cannot be used: unreadable, empty, corrupt compression, not UTF-8, bad records. The
    message names the file (and the line, where there is one). A ``ValueError`` (bad input: every command
    prints it as one line and exits 2) and an ``OSError`` (the file could not be read as data), like
    ``io.UnsupportedOperation``."""


def read_lines(path: Path, error: type[Exception] = DataFileError) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` of a plain or ``.gz`` file, undecoded (an empty file has none). A
    missing or unreadable file, a ``.gz`` that is not gzip, and a truncated or corrupt gzip stream raise
    ``error`` naming the file (a stream that breaks off also names its last complete line)."""
    if path.is_dir():
        raise error(f"{path}: is a directory, not a file")
    if not path.exists():
        raise error(f"{path}: file not found")
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from exc
    lineno = 0
    with raw:
        fh: Any = raw
        if path.name.endswith(".gz"):
            magic = raw.read(2)
            if not magic:
                return
            if magic != b"\x1f\x8b":
                raise error(f"{path}: not gzip-compressed (the name ends in .gz)")
            raw.seek(0)
            fh = gzip.GzipFile(fileobj=raw, mode="rb")
        try:
            for lineno, line in enumerate(fh, 1):
                yield lineno, line
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise error(f"{path}: truncated or corrupt gzip after line {lineno} ({exc})") from exc
        except OSError as exc:
            raise error(f"{path}: cannot read after line {lineno} ({exc.strerror or exc})") from exc


def decode_line(path: Path, lineno: int, raw: bytes, error: type[Exception] = DataFileError) -> str:
    """``raw`` as UTF-8, or ``error`` naming file:line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc


def read_jsonl(path: Path, error: type[Exception] = DataFileError) -> list[Any]:
    """All records of a JSON Lines file, plain or ``.gz`` (blank lines skipped); a file that cannot be read
    (``read_lines``), a line that is not UTF-8 or not JSON raise ``error`` naming file:line."""
    rows = []
    for lineno, raw in read_lines(path, error):
        line = decode_line(path, lineno, raw, error)
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: invalid JSON ({e})") from e
    return rows
