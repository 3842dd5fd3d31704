"""Run a worker script under ``torchrun`` (gloo on CPU) from a test, with a clear failure message."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        C2F_DEVICE="cpu",
        PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        PYTHONWARNINGS="ignore",
        WANDB_MODE="disabled",
    )
    return env


def _run(cmd: list[str], timeout: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run in a new session so that a timeout kills the launcher *and* every worker it started."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(cmd[:4])}... timed out after {timeout} s\n{out[-4000:]}\n{err[-6000:]}"
        ) from exc
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_torchrun(script: str | Path, nproc: int, args: list[str], timeout: int = 600) -> str:
    """Run ``torchrun --nproc_per_node=nproc script args``; return stdout, raise with the logs on failure."""
    script = Path(script)
    if not script.is_absolute():
        script = WORKERS / script
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]
    threads = max(1, 2 // nproc)
    proc = _run(cmd, timeout, worker_env(threads))
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script.name} (nproc={nproc}) failed with exit code {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc.stdout


def run_python(script: str | Path, args: list[str], timeout: int = 600, threads: int = 2) -> str:
    """Run a worker in a fresh single process (process-global patches stay out of pytest)."""
    script = Path(script)
    if not script.is_absolute():
        script = WORKERS / script
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=worker_env(threads),
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{script.name} failed with exit code {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc.stdout


def run_c2f(*args: object, timeout: int = 300) -> subprocess.CompletedProcess:
    """``c2f ARGS`` in a fresh process, from the repository root (example configs resolve)."""
    return subprocess.run(
        [sys.executable, "-m", "c2f_megatron.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=worker_env(2),
        cwd=REPO_ROOT,
    )


def refusal(proc: subprocess.CompletedProcess, command: str | None = None) -> str:
    """The one line a refused ``c2f`` command printed: exit code 2, no traceback anywhere, exactly one line
    on stderr (starting ``c2f COMMAND:`` when ``command`` is given). Returns that line."""
    everything = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 2, everything
    assert "Traceback" not in proc.stdout + proc.stderr, everything
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, everything
    if command is not None:
        assert lines[0].startswith(f"c2f {command}: "), lines[0]
    return lines[0]
