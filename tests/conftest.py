"""Shared pytest fixtures: locating ../shared/data and running multi-process jobs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("C2F_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only ../shared/data directory; fails (not skips) with a clear message when absent."""
    path = _shared_data_dir()
    if not (path / "README.md").is_file():
        pytest.fail(
            f"shared data not found at {path}: these tests read the HH-RLHF / benchmark files in place. "
            "Check out the repository next to 'shared/' or set C2F_SHARED_DATA=/path/to/shared/data."
        )
    return path
