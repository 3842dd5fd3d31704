"""Checks that need a GPU (``benchmarks/gpu_check.sh`` runs them; skipped on CPU machines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import REPO_ROOT, WORKERS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _run(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "C2F_DEVICE"}
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run(
        [sys.executable, str(WORKERS / "plan_bytes.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("distributed", [False, True])
def test_plan_bytes_equal_cuda_tensors(tmp_path: Path, distributed: bool) -> None:
    """The plan's weight, gradient and optimizer bytes equal what one bf16 CUDA step allocates."""
    flag = ["--distributed"] if distributed else []
    _run(["--plan", "--out", str(tmp_path / "p.json"), "--dtype", "bf16", *flag])
    _run(["--out", str(tmp_path / "r.json"), "--dtype", "bf16", *flag])
    p, r = (json.loads((tmp_path / f).read_text()) for f in ("p.json", "r.json"))
    assert r == {"weights": [p["weights"]], "grads": [p["grads"]], "optimizer": p["optimizer"]}
