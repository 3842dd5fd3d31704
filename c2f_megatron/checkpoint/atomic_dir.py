"""Atomic output directories: write into ``OUT.partial``, rename to ``OUT`` when complete.

A reader never sees a half-written ``OUT``; a rerun clears a leftover ``.partial``. These are the
single-process steps; ``megatron_dir.prepare_output``/``commit_output`` run them on rank 0 between
barriers. Torch-free, so the HF merge (which never imports torch) uses them directly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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


def commit_output(tmp: Path, out: Path) -> Path:
    """Move the complete ``tmp`` to ``out``, replacing an old ``out`` (kept as ``out.old`` until then)."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out
