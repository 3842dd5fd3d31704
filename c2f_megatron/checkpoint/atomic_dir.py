"""Atomic output directories: write into ``OUT.partial``, rename to ``OUT`` when complete.

A reader never sees a half-written ``OUT``; a rerun clears a leftover ``.partial``, and so does a failed
write (``cleanup_on_failure``), which also reports a full disk as one line (``NoSpaceError``). The commit
writes the directory's manifest (``manifest``: every file's size and CRC-32, each file fsynced), renames,
and fsyncs the parent, so a published ``OUT`` is on disk. These are the single-process steps;
``megatron_dir.prepare_output``/``commit_output`` run them on rank 0 between barriers. Torch-free, so the
HF merge (which never imports torch) uses them directly.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from c2f_megatron.checkpoint import CheckpointError
from c2f_megatron.checkpoint.manifest import FileRecord, file_records, fsync_dir, list_files, write_manifest

# Below this much free space (or 5% of the filesystem) a failed write is taken for a full disk even when
# the error does not say so (torch's "[enforce fail at inline_container.cc]", megatron's "Worker failure").
LOW_SPACE_BYTES = 64 << 20


class NoSpaceError(CheckpointError):
    """An output that did not fit on its filesystem."""


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def prepare_output(out: Path, force: bool = False) -> Path:
    """Refuse an existing ``out`` unless ``force``; return a fresh, empty ``out.partial``."""
    tmp = partial_path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: output already exists (pass --force to replace it)")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_output(tmp: Path, out: Path, written: Sequence[FileRecord] = ()) -> Path:
    """Write ``tmp``'s manifest, fsync, and move ``tmp`` to ``out``, replacing an old ``out`` (kept as
    ``out.old`` until then). ``written``: records of files already fsynced by their writer
    (``manifest.RecordingFile``); the other files are read back for theirs and fsynced here."""
    known = {r.path for r in written}
    rest = file_records(tmp, [f for f in list_files(tmp) if f not in known])
    write_manifest(tmp, [*written, *rest])
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)
    return out


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def _existing(path: Path) -> Path:
    path = Path(os.path.realpath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the per-rank failures torch.distributed.checkpoint wraps."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        todo += [f[0] for f in getattr(e, "failures", {}).values() if isinstance(f, tuple) and f]


def _is_failure(exc: BaseException) -> bool:
    """An error (not a KeyboardInterrupt or SystemExit), including torch.distributed.checkpoint's
    ``CheckpointException``, which derives from BaseException."""
    return isinstance(exc, Exception) or hasattr(exc, "failures")


def mount_point(path: Path) -> Path:
    path = _existing(path)
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def looks_like_no_space(exc: BaseException, where: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain, the texts torch and safetensors wrap them in, or a
    failed write (OSError/RuntimeError) on a filesystem that is nearly full."""
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if "no space left" in text or "os error 28" in text or "quota exceeded" in text:
            return True
    benign = (FileExistsError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    if not any(isinstance(e, (OSError, RuntimeError)) and not isinstance(e, benign) for e in chain):
        return False
    usage = shutil.disk_usage(_existing(where))
    return usage.free < max(LOW_SPACE_BYTES, usage.total // 20)


@contextmanager
def cleanup_on_failure(
    outs: Path | Sequence[Path], need_bytes: int | None = None, what: str | None = None
) -> Iterator[None]:
    """Around the writing of ``outs`` (from ``prepare_output`` to ``commit_output``): on any exception remove
    each ``out.partial`` and the parent directories made for them; an out-of-space failure becomes one
    ``NoSpaceError`` line with the space needed (``need_bytes``, the writer's estimate for ``what``, default
    the output's path; else at least what was written when the disk filled)."""
    outs = [Path(outs)] if isinstance(outs, (str, Path)) else [Path(o) for o in outs]
    made: list[Path] = []  # parents that do not exist yet, deepest first
    for out in outs:
        parent = out.parent.absolute()
        while not parent.exists() and parent not in made:
            made.append(parent)
            parent = parent.parent
    made.sort(key=lambda p: len(p.parts), reverse=True)
    try:
        yield
    except BaseException as exc:
        tmps = [partial_path(out) for out in outs]
        where = outs[0].parent
        no_space = _is_failure(exc) and looks_like_no_space(exc, where)
        written = sum(tree_bytes(tmp) for tmp in tmps) if no_space else 0
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        for directory in made:
            try:
                directory.rmdir()
            except OSError:
                pass  # not empty: someone else's files
        if not no_space or isinstance(exc, NoSpaceError):
            raise
        free = shutil.disk_usage(_existing(where)).free
        need = f"need ~{_gb(need_bytes)}" if need_bytes else f"need more than {_gb(written)}"
        removed = ", ".join(tmp.name for tmp in tmps)
        raise NoSpaceError(
            f"no space left on {mount_point(where)}: {need} for {what or outs[0]}, {_gb(free)} free "
            f"(the incomplete {removed} removed)"
        ) from exc
