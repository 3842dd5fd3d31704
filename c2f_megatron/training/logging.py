"""Metrics out of the loop: console progress with rate and ETA, ``metrics.jsonl``, and wandb (rank 0 only).

wandb runs offline by default (files under the run directory, ``wandb sync`` uploads later) so a training
job never needs the network; ``online`` is opt-in and ``disabled`` turns it off. The ``WANDB_MODE``
environment variable, when set, wins (tests set it to ``disabled``). The run directory keeps its wandb run
id (``wandb_run_id``), so a resumed or requeued job continues the same wandb run; a trainer that saves
``MetricsLogger.run_id`` in its checkpoints (``TrainerState.extra[WANDB_ID_KEY]``: every trainer does) and
passes it back on resume continues it even from a new run directory.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from c2f_megatron.files import write_atomic
from c2f_megatron.platform.distributed import is_rank_zero
from c2f_megatron.training.config import LoggingConfig


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_value(value: Any, short: bool = False) -> str:
    """Floats with four decimals (``short``: four significant digits, the compact console line's)."""
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}" if short else f"{value:.3e}"
        return f"{value:.4g}" if short else f"{value:.4f}"
    return str(value)


# The console line's budget: step, rate, ETA and the job's key metrics fit; everything else is in
# metrics.jsonl and wandb (``logging.verbose`` prints it all).
CONSOLE_WIDTH = 160


WANDB_ID_FILE = "wandb_run_id"
WANDB_ID_KEY = "wandb_run_id"  # the id in a checkpoint's trainer state (``TrainerState.extra``)


def wandb_mode(cfg: LoggingConfig) -> str:
    """The mode wandb runs in: ``$WANDB_MODE`` when set, else ``logging.wandb_mode``."""
    return os.environ.get("WANDB_MODE", cfg.wandb_mode)


def wandb_run_id(run_dir: Path, from_checkpoint: str | None = None) -> str:
    """The job's wandb id: the run directory's (``run_dir/wandb_run_id``), else the resumed checkpoint's
    (``from_checkpoint``: the run directory was lost or is a new one), else a new id; kept in the run
    directory, so a resumed or requeued job logs into the same wandb run instead of starting a new one."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = from_checkpoint or uuid.uuid4().hex[:16]
    write_atomic(path, run_id + "\n")
    return run_id


class MetricsLogger:
    """Per-step metrics to the console (rank 0), ``<run_dir>/metrics.jsonl`` and wandb.

    ``log(step, metrics, prefix)`` takes floats; ``train`` steps drive the rate/ETA estimate. The console
    shows ``console_keys`` (``(metric, label)`` pairs: the job's key metrics) on one line of at most about
    ``CONSOLE_WIDTH`` characters, unless ``cfg.verbose``; ``metrics.jsonl`` and wandb get every metric.

    ``checkpoint_run_id``: the wandb id saved in the checkpoint the job resumed from (``wandb_run_id``
    decides); ``run_id`` is the id to save in the next checkpoint (None when wandb never ran).
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        total_steps: int,
        config_dump: dict[str, Any] | None = None,
        start_step: int = 0,
        stream: Any = None,
        console_keys: Sequence[tuple[str, str]] = (),
        unit: str = "step",
        checkpoint_run_id: str | None = None,
    ):
        self.cfg = cfg
        self.total_steps = total_steps
        self.start_step = start_step
        self.console_keys = tuple(console_keys)
        self.unit = unit
        self.rank_zero = is_rank_zero()
        self.stream = stream or sys.stdout
        self._t0 = time.perf_counter()
        self._wandb = None
        self._jsonl = None
        self.run_id = checkpoint_run_id
        if not self.rank_zero:
            return
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if config_dump is not None:  # written when the run starts, so a refused job leaves nothing behind
            import yaml

            write_atomic(run_dir / "config.yaml", yaml.safe_dump(config_dump, sort_keys=False))
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        mode = wandb_mode(cfg)
        if mode != "disabled":
            import wandb

            self.run_id = wandb_run_id(run_dir, checkpoint_run_id)
            self._wandb = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                name=cfg.run_name,
                mode=mode,
                dir=str(run_dir),
                config=config_dump,
                id=self.run_id,
                resume="allow",
                settings=wandb.Settings(silent=True),  # the job's own summary says where its files are
            )

    def elapsed(self) -> float:
        """Seconds since the logger (the job's loop) started."""
        return time.perf_counter() - self._t0

    def progress(self, step: int) -> str:
        """``step/total``, steps per second since start, and ETA."""
        done = step - self.start_step
        elapsed = self.elapsed()
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        width = len(str(self.total_steps))
        speed = f"{rate:.2f} it/s" if rate >= 0.1 or rate == 0 else f"{1 / rate:.1f} s/it"
        return f"{self.unit} {step:>{width}}/{self.total_steps} | {speed} | eta {format_duration(eta)}"

    def console_line(self, step: int, metrics: dict[str, Any], prefix: str) -> str:
        head = self.progress(step) if prefix == "train" else f"{prefix} @ {self.unit} {step}"
        if self.cfg.verbose:
            return " | ".join([head, *(f"{k} {format_value(v)}" for k, v in metrics.items())])
        keys = [(k, label) for k, label in self.console_keys if k in metrics]
        if not keys:  # not a record the job named keys for (e.g. an eval): its first metrics
            keys = [(k, k) for k in metrics]
        line = head
        for key, label in keys:
            part = f" | {label} {format_value(metrics[key], short=True)}"
            if len(line) + len(part) > CONSOLE_WIDTH:
                break
            line += part
        return line

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train", console: bool = True) -> None:
        if not self.rank_zero:
            return
        named = {f"{prefix}/{k}": v for k, v in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **named}, default=float) + "\n")
        if self._wandb is not None:
            self._wandb.log(named, step=step)
        if console:
            print(self.console_line(step, metrics, prefix), file=self.stream, flush=True)

    def log_table(self, step: int, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table (e.g. sample responses) to wandb under ``key`` at ``step``; a no-op without wandb."""
        if self._wandb is None:
            return
        import wandb

        self._wandb.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=step)

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
