"""Small files written whole or not at all, and JSON Lines read with errors naming file and line.

``write_atomic`` is every text file a job writes beside its checkpoints (reports, summaries, markers, the
list of skipped records, checkpoint metadata): a temp file in the same directory, renamed over the target,
so a reader never sees half a file. Torch-free (like ``config``, a module every floor may import), so a
report or an HF-mode merge that uses it never pays for torch.
"""

from __future__ import annotations

import json
import os
import tempfile
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


def read_jsonl(path: Path, error: type[Exception] = ValueError) -> list[Any]:
    """All records of a JSON Lines file (blank lines skipped); a missing file or a bad line raises ``error``
    naming file:line."""
    if not path.is_file():
        raise error(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{lineno}: invalid JSON ({e})") from e
    return rows
