"""The loop every trainer runs (LM/SFT/RM steps and PPO iterations alike), written once.

A run supplies ``step(index) -> StepOutcome`` (the work of one optimizer step or PPO iteration, its metrics
and whether a non-finite loss or grad norm made it skip its update) and ``save() -> Path | None``; the loop
does the rest, in this order after every step:

- count it (``TrainerState.step``, consumed samples) and log it (every ``log_interval``, and always when
  skipped);
- the non-finite guard: after ``max_consecutive_nonfinite`` skipped steps in a row, stop with
  ``NonFiniteLossError`` naming the last good checkpoint;
- ``after_step`` (e.g. a periodic evaluation whose numbers go into the next save);
- save at every ``save_interval``, at the end, and when ``exit_after`` is reached (then stop: preemption
  drills);
- preemption (SIGUSR1/SIGTERM or ``$C2F_PREEMPT_REQUEST``): save if not just saved, mark, stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from c2f_megatron.training.checkpointing import TrainerState
from c2f_megatron.training.logging import MetricsLogger
from c2f_megatron.training.preemption import PreemptionHandler


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or grad norm."""


@dataclass
class StepOutcome:
    record: dict[str, Any]
    skipped: bool = False  # the update was not applied (non-finite loss or grad norm)
    samples: int = 0  # samples (sequences, pairs, prompts) the step consumed


@dataclass
class LoopSettings:
    """When to log, save and stop; the ``*_field`` names are the config fields messages refer to."""

    total_steps: int
    log_interval: int = 1
    save_interval: int = 0  # 0: only at the end
    exit_after: int | None = None
    max_consecutive_nonfinite: int = 3
    unit: str = "step"
    exit_field: str = "train.exit_after_steps"
    nonfinite_field: str = "train.max_consecutive_nan"


@dataclass
class LoopResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    last_saved: Path | None = None
    stopped: str = "done"  # done | exit_after | preempted


def run_loop(
    settings: LoopSettings,
    state: TrainerState,
    step: Callable[[int], StepOutcome],
    save: Callable[[], Path | None],
    log: MetricsLogger,
    last_saved: Path | None = None,
    after_step: Callable[[int, bool], None] | None = None,
) -> LoopResult:
    """Run ``step`` until ``state.step`` reaches ``settings.total_steps`` (or an exit); closes ``log``."""
    result = LoopResult(last_saved=last_saved)
    consecutive_bad = 0
    preempt = PreemptionHandler.from_env()
    try:
        while state.step < settings.total_steps:
            outcome = step(state.step)
            state.step += 1
            state.consumed_samples += outcome.samples
            result.history.append(outcome.record)
            if state.step % settings.log_interval == 0 or outcome.skipped:
                log.log(state.step, outcome.record)
            if outcome.skipped:
                consecutive_bad += 1
                log.message(
                    f"{settings.unit} {state.step}: non-finite loss or grad norm; update skipped "
                    f"({consecutive_bad} in a row)"
                )
                if consecutive_bad >= settings.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{consecutive_bad} consecutive non-finite {settings.unit}s ({settings.nonfinite_field}="
                        f"{settings.max_consecutive_nonfinite}); stopping at {settings.unit} {state.step}. "
                        + (
                            f"Last good checkpoint: {result.last_saved}"
                            if result.last_saved
                            else "No checkpoint saved yet"
                        )
                    )
            else:
                consecutive_bad = 0
            done = state.step >= settings.total_steps
            if after_step is not None:
                after_step(state.step, done)
            exit_now = settings.exit_after is not None and state.step >= settings.exit_after
            periodic = bool(settings.save_interval) and state.step % settings.save_interval == 0
            saved_now = periodic or done or exit_now
            if saved_now:
                result.last_saved = save()
            if exit_now and not done:
                log.message(
                    f"{settings.exit_field}={settings.exit_after}: stopping at {settings.unit} {state.step}"
                )
                result.stopped = "exit_after"
                break
            if not done and preempt.should_stop():
                result.last_saved = result.last_saved if saved_now else save()
                preempt.mark_preempted(state.step, result.last_saved)
                log.message(
                    f"preempted ({preempt.reason()}): checkpointed and stopping at {settings.unit} {state.step}"
                )
                result.stopped = "preempted"
                break
    finally:
        preempt.uninstall()
        log.close()
    return result
