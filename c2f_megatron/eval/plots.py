"""PNG plots of a pipeline run: the coarse actor's PPO curves and each evaluation metric against gamma.

The paper's argument is visual: reward climbs while Continuous Maximization raises the length limit, and
the merged models trace a path between the SFT model (gamma 0) and the coarse actor (gamma 1). matplotlib
is imported lazily with the Agg backend (no display); files are written to a temp path and renamed.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The table's metric columns worth a panel, with their axis labels.
GAMMA_METRICS: dict[str, str] = {
    "reward_mean": "RM reward (mean)",
    "win_rate": "win rate vs SFT (RM)",
    "length_mean": "response length (tokens)",
    "eos_fraction": "fraction ended with EOS",
    "redundancy": "redundancy (repeated 3-grams)",
    "distinct_2": "distinct-2",
    "perplexity": "perplexity of held-out chosen",
}


def read_metrics_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (prefix stripped: ``train/reward_mean`` -> ``reward_mean``)."""
    from c2f_megatron.eval.benchmarks import read_jsonl

    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file not found")
    return [
        {key.split("/", 1)[-1]: value for key, value in raw.items()} for raw in read_jsonl(path, ValueError)
    ]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
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


def plot_ppo_curves(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Reward mean and the CM length limit the rollout used, per PPO iteration (one record per step).

    A resumed run appends to metrics.jsonl; the last record of each step wins."""
    by_step = {int(r["step"]): r for r in history if "reward_mean" in r}
    if not by_step:
        raise ValueError(f"no PPO records with reward_mean to plot for {path}")
    steps = sorted(by_step)
    plt = _pyplot()
    fig, (ax_r, ax_l) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    raw = all("reward_raw_mean" in by_step[s] for s in steps)  # the RM's own score, before normalisation
    key_r = "reward_raw_mean" if raw else "reward_mean"
    ax_r.plot(steps, [by_step[s][key_r] for s in steps], marker="o", ms=3)
    ax_r.set_ylabel("RM score (mean)" if raw else "reward (mean)")
    ax_r.set_title("Coarse Actor PPO")
    key = "rollout_length_limit" if "rollout_length_limit" in by_step[steps[0]] else "length_limit"
    ax_l.step(steps, [by_step[s].get(key, math.nan) for s in steps], where="mid", color="tab:orange")
    ax_l.set_ylabel("CM length limit (tokens)")
    ax_l.set_xlabel("PPO iteration")
    for ax in (ax_r, ax_l):
        ax.grid(alpha=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _value(row: dict[str, Any], key: str) -> float:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and v is not None else math.nan


def plot_metrics_vs_gamma(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One panel per metric: merged models against gamma, the SFT and coarse rows as reference lines."""
    merged = sorted((r for r in rows if r.get("gamma") is not None), key=lambda r: r["gamma"])
    refs = {r["model"]: r for r in rows if r.get("gamma") is None}
    metrics = [k for k in GAMMA_METRICS if any(not math.isnan(_value(r, k)) for r in rows)]
    if not merged or not metrics:
        raise ValueError(f"nothing to plot for {path}: need merged rows with a gamma and metric columns")
    plt = _pyplot()
    cols = 2
    nrows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(10, 2.8 * nrows), squeeze=False)
    gammas = [r["gamma"] for r in merged]
    for ax, key in zip(axes.flat, metrics):
        ax.plot(gammas, [_value(r, key) for r in merged], marker="o", label="merged")
        for name, style in (("sft", ":"), ("coarse", "--")):
            if name in refs and not math.isnan(_value(refs[name], key)):
                ax.axhline(_value(refs[name], key), linestyle=style, color="gray", label=name)
        ax.set_title(GAMMA_METRICS[key], fontsize=10)
        ax.set_xlabel("gamma (weight of the coarse actor)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
