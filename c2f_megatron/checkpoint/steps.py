"""Step directories of a training root (``ROOT/step_0000100``): which are complete, which is the latest.

A trainer writes each step to ``step_N.partial`` and renames it when every rank is done, writing
``trainer_state.json`` last; a step is complete when it was renamed, holds that file, and holds a
``c2f_checkpoint.json`` for every model it lists. Readers (resume, the resolver, the pipeline) take only
complete steps. Torch-free.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from c2f_megatron.checkpoint import METADATA_FILE

STEP_DIR = re.compile(r"^step_(\d{7,})$")
TRAINER_STATE_FILE = "trainer_state.json"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    """A renamed step directory with trainer state and, for every model in it, its c2f metadata."""
    if not STEP_DIR.match(path.name) or not (path / TRAINER_STATE_FILE).is_file():
        return False
    try:
        state = json.loads((path / TRAINER_STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    names = state.get("models", [""])
    return all((path / name / METADATA_FILE).is_file() for name in names)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete step directory, or None; ``.partial`` or half-written steps are skipped."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None
