"""What a job leaves behind, said once at its end: the summary block and ``<run_dir>/summary.md``.

Every trainer and the PPO run end with a ``RunSummary``: what ran and how long it took, where each output
is (checkpoint, metrics, plots, wandb files), key metrics at the first and the last step, and for PPO a
plot of reward, critic loss and the length limit plus sample responses. Metrics are read back from
``metrics.jsonl``, so a resumed run reports its whole history (the last record of a step wins). The PNG
helpers here are the ones the pipeline report uses too.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from c2f_megatron.files import read_jsonl, write_atomic
from c2f_megatron.training.config import LoggingConfig
from c2f_megatron.training.logging import format_duration, format_value, wandb_mode

SUMMARY_FILE = "summary.md"


def read_metrics_jsonl(path: Path, prefix: str | None = None) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (prefix stripped: ``train/reward_mean`` -> ``reward_mean``); with
    ``prefix`` only the records logged under it (``train``, ``eval``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file not found")
    return [
        {key.split("/", 1)[-1]: value for key, value in raw.items()}
        for raw in read_jsonl(path)
        if prefix is None or any(key.startswith(f"{prefix}/") for key in raw)
    ]


def history_by_step(records: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The records that carry ``key``, one per step (the last one written wins: resumes append), in order."""
    by_step = {int(r["step"]): r for r in records if key in r and "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write a figure as PNG through a temp file and a rename (never half-written), mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be read by others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_ppo_curves(runs: dict[str, Sequence[dict[str, Any]]], path: Path) -> Path:
    """Per PPO iteration, one line per run: the reward model's score, the critic (value) loss and the
    length limit the rollout used (the CM controller's, or a fixed/step schedule's)."""
    series = {name: steps for name, h in runs.items() if (steps := history_by_step(h, "reward_mean"))}
    if not series:
        raise ValueError(f"no PPO records with reward_mean to plot for {path}")
    plt = pyplot()
    fig, (ax_r, ax_c, ax_l) = plt.subplots(3, 1, figsize=(6.5, 7), sharex=True)
    for name, records in series.items():
        steps = [int(r["step"]) for r in records]
        raw = all("reward_raw_mean" in r for r in records)  # the RM's own score, before normalisation
        ax_r.plot(steps, [r["reward_raw_mean" if raw else "reward_mean"] for r in records], label=name)
        ax_c.plot(steps, [r.get("vf_loss", math.nan) for r in records], label=name)
        key = "rollout_length_limit" if "rollout_length_limit" in records[0] else "length_limit"
        ax_l.step(steps, [r.get(key, math.nan) for r in records], where="mid", label=name)
    ax_r.set_ylabel("RM score (mean)")
    ax_r.set_title("PPO runs" if len(series) > 1 else f"PPO: {next(iter(series))}")
    ax_c.set_ylabel("critic loss")
    ax_l.set_ylabel("length limit (tokens)")
    ax_l.set_xlabel("PPO iteration")
    for ax in (ax_r, ax_c, ax_l):
        ax.grid(alpha=0.3)
    ax_r.legend(fontsize=8)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


@dataclass
class Sample:
    """One generated response, for the summary: where it came from, the prompt and the text."""

    title: str
    prompt: str
    response: str


@dataclass
class RunSummary:
    """``metrics``: (name, value at the start, value at the end; start None throughout: one value, as
    an evaluation has); ``outputs``: label -> path."""

    job: str
    run_dir: Path
    seconds: float
    progress: str  # e.g. "20/20 iterations" or "12/20 steps (preempted)"
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[str, float | None, float | None]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    columns: tuple[str, str] = ("start", "end")

    @property
    def single_value(self) -> bool:
        """Metrics without a start value (an evaluation): one value column."""
        return all(a is None for _, a, _ in self.metrics)

    def _metric_rows(self) -> list[tuple[str, str, str]]:
        def fmt(v: float | None) -> str:
            return "-" if v is None else format_value(float(v))

        return [(name, fmt(a), fmt(b)) for name, a, b in self.metrics]

    def console(self, width: int = 100) -> str:
        head = f" c2f {self.job}: {self.progress} in {format_duration(self.seconds)} "
        lines = [f"{head:=^{width}}"]
        pad = max((len(k) for k in self.outputs), default=0)
        lines += [f"{k:<{pad}}  {v}" for k, v in self.outputs.items()]
        if self.metrics:
            rows = self._metric_rows()
            w = max(len(r[0]) for r in rows)
            if self.single_value:
                lines += [f"{n:<{w}}  {b:>10}" for n, _, b in rows]
            else:
                lines.append(f"{'metric':<{w}}  {self.columns[0]:>10}  {self.columns[1]:>10}")
                lines += [f"{n:<{w}}  {a:>10}  {b:>10}" for n, a, b in rows]
        for s in self.samples:
            lines.append(f"--- {s.title}")
            if s.prompt:
                lines.append(f"prompt:   {_one_line(s.prompt, width - 10)}")
            lines.append(f"response: {_one_line(s.response, 3 * width)}")
        lines.append("=" * width)
        return "\n".join(lines)

    def markdown(self) -> str:
        out = [f"# c2f {self.job}", "", f"{self.progress} in {format_duration(self.seconds)}.", ""]
        out += ["| output | path |", "|---|---|"]
        out += [f"| {k} | `{v}` |" for k, v in self.outputs.items()]
        if self.metrics and self.single_value:
            out += ["", "| metric | value |", "|---|---|"]
            out += [f"| {n} | {b} |" for n, _, b in self._metric_rows()]
        elif self.metrics:
            out += ["", f"| metric | {self.columns[0]} | {self.columns[1]} |", "|---|---|---|"]
            out += [f"| {n} | {a} | {b} |" for n, a, b in self._metric_rows()]
        for s in self.samples:
            out += ["", f"## {s.title}", ""]
            if s.prompt:
                out += ["Prompt:", "", _quote(s.prompt), "", "Response:", ""]
            out.append(_quote(s.response))
        return "\n".join(out) + "\n"

    def write(self) -> Path:
        """``<run_dir>/summary.md``, written atomically."""
        path = self.run_dir / SUMMARY_FILE
        write_atomic(path, self.markdown())
        return path

    def finish(self) -> Path:
        """The end of a job: ``summary.md`` written, the block printed."""
        path = self.write()
        print(self.console(), flush=True)
        return path


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.strip().splitlines()) or "> (empty)"


def start_end(
    records: Sequence[dict[str, Any]], keys: Sequence[str]
) -> list[tuple[str, float | None, float | None]]:
    """(key, first value, last value) for every key some record carries, in ``keys`` order."""
    rows = []
    for key in keys:
        values = [r[key] for r in history_by_step(records, key) if isinstance(r[key], int | float)]
        if values:
            rows.append((key, float(values[0]), float(values[-1])))
    return rows


def wandb_output(run_dir: Path, mode: str) -> str | None:
    """Where wandb wrote this run, and how to upload it when it ran offline."""
    if mode == "disabled":
        return None
    where = run_dir / "wandb"
    return f"{where} (offline: wandb sync {where}/offline-run-*)" if mode == "offline" else str(where)


def job_outputs(
    run_dir: Path, checkpoint: Path | None, logging_cfg: LoggingConfig, **more: Path | None
) -> dict[str, str]:
    """The outputs every job has (checkpoint, metrics, config, wandb, this summary) plus ``more``."""
    outputs = {"run dir": str(run_dir), "checkpoint": str(checkpoint) if checkpoint else "(none saved)"}
    outputs["metrics"] = str(run_dir / "metrics.jsonl")
    outputs["config"] = str(run_dir / "config.yaml")
    outputs.update({k.replace("_", " "): str(v) for k, v in more.items() if v is not None})
    wandb = wandb_output(run_dir, wandb_mode(logging_cfg))
    if wandb:
        outputs["wandb"] = wandb
    outputs["summary"] = str(run_dir / SUMMARY_FILE)
    return outputs


def stopped_progress(step: int, total: int, unit: str, stopped: str) -> str:
    text = f"{step}/{total} {unit}s"
    return text if stopped == "done" else f"{text} ({stopped})"
