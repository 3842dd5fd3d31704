"""Metrics out of the loop: console progress with rate and ETA, ``metrics.jsonl``, and wandb (rank 0 only).

wandb runs offline by default (files under the run directory, ``wandb sync`` uploads later) so a training
job never needs the network; ``online`` is opt-in and ``disabled`` turns it off. The ``WANDB_MODE``
environment variable, when set, wins (tests set it to ``disabled``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from c2f_megatron.platform.distributed import is_rank_zero
from c2f_megatron.training.config import LoggingConfig


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


class MetricsLogger:
    """Per-step metrics to the console (rank 0), ``<run_dir>/metrics.jsonl`` and wandb.

    ``log(step, metrics, prefix)`` takes floats; ``train`` steps drive the rate/ETA estimate.
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        total_steps: int,
        config_dump: dict[str, Any] | None = None,
        start_step: int = 0,
        stream: Any = None,
    ):
        self.cfg = cfg
        self.total_steps = total_steps
        self.start_step = start_step
        self.rank_zero = is_rank_zero()
        self.stream = stream or sys.stdout
        self._t0 = time.perf_counter()
        self._wandb = None
        self._jsonl = None
        if not self.rank_zero:
            return
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        mode = os.environ.get("WANDB_MODE", cfg.wandb_mode)
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                name=cfg.run_name,
                mode=mode,
                dir=str(run_dir),
                config=config_dump,
                resume="allow",
            )

    def progress(self, step: int) -> str:
        """``step/total``, steps per second since start, and ETA."""
        done = step - self.start_step
        elapsed = time.perf_counter() - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        width = len(str(self.total_steps))
        return f"step {step:>{width}}/{self.total_steps} | {rate:.2f} it/s | eta {format_duration(eta)}"

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train", console: bool = True) -> None:
        if not self.rank_zero:
            return
        named = {f"{prefix}/{k}": v for k, v in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **named}, default=float) + "\n")
        if self._wandb is not None:
            self._wandb.log(named, step=step)
        if console:
            head = self.progress(step) if prefix == "train" else f"{prefix} @ step {step}"
            body = " | ".join(f"{k} {format_value(v)}" for k, v in metrics.items())
            print(f"{head} | {body}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.rank_zero:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
