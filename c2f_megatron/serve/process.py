"""``c2f serve`` as a child process: started, waited for until it listens, stopped with SIGTERM.

For benchmarks, tests and scripts that need a local OpenAI-compatible endpoint (a judge, a model under
test) for the length of a block::

    with ServerProcess(["--checkpoint", ckpt]) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused")
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

_READY = re.compile(r"^c2f serve: \S+ at (http://\S+/v1) .*pid (\d+)\)$")


class ServerProcess:
    """``python -m c2f_megatron.cli serve ARGS --port 0`` (torchrun with ``nproc`` > 1); ``url`` once ready.

    stdout and stderr are kept (``output()``) and, with ``log``, also appended to that file."""

    def __init__(
        self,
        args: Sequence[str],
        nproc: int = 1,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        start_timeout_s: float = 300.0,
    ):
        self.args = list(args)
        self.nproc = nproc
        self.env = env
        self.log = log
        self.start_timeout_s = start_timeout_s
        self.url = ""
        self.pid = 0  # the serving process: rank 0 under torchrun
        self.proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._ready = threading.Event()

    def command(self) -> list[str]:
        serve = ["-m", "c2f_megatron.cli", "serve", *self.args]
        if "--port" not in self.args:
            serve += ["--port", "0"]
        if self.nproc == 1:
            return [sys.executable, *serve]
        from socket import socket

        with socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={self.nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            *serve,
        ]

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        sink = self.log.open("a") if self.log else None
        for line in self.proc.stdout:
            self._lines.append(line)
            if sink:
                sink.write(line)
                sink.flush()
            match = _READY.match(line)
            if match and not self._ready.is_set():
                self.url, self.pid = match.group(1), int(match.group(2))
                self._ready.set()
        if sink:
            sink.close()
        self._ready.set()

    def output(self) -> str:
        return "".join(self._lines)

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env if self.env is not None else dict(os.environ),
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(self.start_timeout_s) or not self.url:
            self.kill()
            raise RuntimeError(f"c2f serve did not start:\n{self.output()[-6000:]}")
        return self

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM to the serving rank (it finishes the running batch, then releases the other ranks, and
        torchrun exits with them); the exit code, or SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            os.kill(self.pid or self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.stop() != 0 and exc[0] is None:
            raise RuntimeError(f"c2f serve exited badly:\n{self.output()[-4000:]}")
