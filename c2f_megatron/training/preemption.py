"""Stop a training loop cleanly on preemption: checkpoint at a step boundary, exit 0, leave a marker.

A stop is requested by a signal (SIGUSR1 and SIGTERM by default; ``C2F_PREEMPT_SIGNALS=USR1`` or ``none``
changes that) or by the request file ``$C2F_PREEMPT_REQUEST`` appearing. The file is how the Slurm batch
script (``slurm/common.sh``) reaches every rank on every node without signalling torchrun, which dies on
SIGUSR1. A second delivery of the same signal restores the default action and re-raises it (kills at once).

The loop calls ``should_stop()`` after every step, on every rank: the ranks' flags are all-reduced, so a
signal reaching ranks at different times still stops all of them after the same step. On a stop the loop
saves (if it has not just saved this step), calls ``mark_preempted(step, checkpoint)`` and returns; the CLI
exits 0. The marker ``$C2F_PREEMPT_MARKER`` tells the batch script to ``scontrol requeue`` (a crash leaves
no marker and a non-zero exit, so it is not requeued). The requeued job resumes from that checkpoint at
the next step: no step is lost or repeated.

The hook in a trainer (see ``training/trainer.py``)::

    preempt = PreemptionHandler.from_env()                     # before the loop (installs the handlers)
    ...                                                          # after each step and its periodic save:
    if not done and preempt.should_stop():
        preempt.mark_preempted(step, checkpoint if saved_this_step else save()); return
    ...
    preempt.uninstall()                                          # in the loop's ``finally``
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from c2f_megatron.files import write_atomic

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("USR1", "TERM")
REQUEST_ENV = "C2F_PREEMPT_REQUEST"
MARKER_ENV = "C2F_PREEMPT_MARKER"
SIGNALS_ENV = "C2F_PREEMPT_SIGNALS"


def parse_signals(spec: str | Iterable[str | int] | None) -> list[signal.Signals]:
    """``"USR1,TERM"`` / ``["SIGUSR1", 15]`` -> signals; ``"none"`` or ``""`` -> none."""
    if spec is None:
        spec = DEFAULT_SIGNALS
    if isinstance(spec, str):
        spec = [] if spec.strip().lower() in ("", "none") else [s.strip() for s in spec.split(",")]
    out = []
    for item in spec:
        if isinstance(item, int) or str(item).isdigit():
            out.append(signal.Signals(int(item)))
            continue
        name = str(item).upper()
        try:
            out.append(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
        except KeyError:
            raise ValueError(f"{SIGNALS_ENV}: unknown signal {item!r}") from None
    return out


class PreemptionHandler:
    """A stop flag set by signals or a request file, agreed on by all ranks; see the module docstring."""

    def __init__(
        self,
        signals: str | Iterable[str | int] | None = DEFAULT_SIGNALS,
        request_file: str | Path | None = None,
        marker_file: str | Path | None = None,
        install: bool = True,
    ):
        self.signals = parse_signals(signals)
        self.request_file = Path(request_file) if request_file else None
        self.marker_file = Path(marker_file) if marker_file else None
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        if install:
            self.install()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, install: bool = True) -> PreemptionHandler:
        env = os.environ if environ is None else environ
        return cls(
            signals=env.get(SIGNALS_ENV, ",".join(DEFAULT_SIGNALS)),
            request_file=env.get(REQUEST_ENV) or None,
            marker_file=env.get(MARKER_ENV) or None,
            install=install,
        )

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("preemption signal handlers not installed: not on the main thread")
            return
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received == sig:  # asked twice: stop waiting for the step boundary
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        self.received = sig

    def requested(self) -> bool:
        """This rank's view: a signal arrived or the request file exists (no communication)."""
        return self.received is not None or (self.request_file is not None and self.request_file.exists())

    def should_stop(self) -> bool:
        """True on every rank if any rank saw a request. Collective: call it on all ranks at the same step."""
        local = self.requested()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        from c2f_megatron.platform.distributed import device

        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def reason(self) -> str:
        if self.received is not None:
            return self.received.name
        if self.request_file is not None and self.request_file.exists():
            return f"request file {self.request_file}"
        return "another rank's request"

    def mark_preempted(self, step: int, checkpoint: str | Path | None) -> None:
        """Rank 0 writes the marker the batch script looks for (atomically); every rank may call it."""
        if self.marker_file is None or (dist.is_initialized() and dist.get_rank() != 0):
            return
        self.marker_file.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "step": step,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "reason": self.reason(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_atomic(self.marker_file, json.dumps(record) + "\n")
