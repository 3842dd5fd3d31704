"""PNG plots of a pipeline run: PPO curves, each evaluation metric against gamma, grouped bars.

The paper's argument is visual: reward climbs while Continuous Maximization raises the length limit, and
the merged models trace a path between the partner (gamma 0) and the coarse actor (gamma 1); its Figure 2
is MMLU by category and its Figure 3 pairwise win rates. matplotlib is imported lazily with the Agg
backend (no display); files are written to a temp path and renamed.
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
    "win_rate": "win rate vs the partner (RM)",
    "length_mean": "response length (tokens)",
    "eos_fraction": "fraction ended with EOS",
    "redundancy": "redundancy (repeated 3-grams)",
    "distinct_2": "distinct-2",
    "perplexity": "perplexity of held-out chosen",
    "arc_easy": "ARC-Easy (acc)",
    "arc_challenge": "ARC-Challenge (acc)",
    "winogrande": "WinoGrande (acc)",
    "mmlu": "MMLU (acc)",
    "bbh": "BBH (exact match)",
    "gsm8k": "GSM8K (exact match)",
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


def plot_ppo_curves(runs: dict[str, Sequence[dict[str, Any]]], path: Path) -> Path:
    """Per PPO iteration, one line per run: the reward model's score, the critic (value) loss and the
    length limit the rollout used (the CM controller's, or a fixed/step schedule's).

    A resumed run appends to metrics.jsonl; the last record of each step wins."""
    series = {}
    for name, history in runs.items():
        by_step = {int(r["step"]): r for r in history if "reward_mean" in r}
        if by_step:
            series[name] = (sorted(by_step), by_step)
    if not series:
        raise ValueError(f"no PPO records with reward_mean to plot for {path}")
    plt = _pyplot()
    fig, (ax_r, ax_c, ax_l) = plt.subplots(3, 1, figsize=(6.5, 7), sharex=True)
    for name, (steps, by_step) in series.items():
        raw = all("reward_raw_mean" in by_step[s] for s in steps)  # the RM's own score, before normalisation
        ax_r.plot(steps, [by_step[s]["reward_raw_mean" if raw else "reward_mean"] for s in steps], label=name)
        ax_c.plot(steps, [by_step[s].get("vf_loss", math.nan) for s in steps], label=name)
        key = "rollout_length_limit" if "rollout_length_limit" in by_step[steps[0]] else "length_limit"
        ax_l.step(steps, [by_step[s].get(key, math.nan) for s in steps], where="mid", label=name)
    ax_r.set_ylabel("RM score (mean)")
    ax_r.set_title("PPO runs")
    ax_c.set_ylabel("critic loss")
    ax_l.set_ylabel("length limit (tokens)")
    ax_l.set_xlabel("PPO iteration")
    for ax in (ax_r, ax_c, ax_l):
        ax.grid(alpha=0.3)
    ax_r.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_bars(groups: dict[str, dict[str, float]], path: Path, title: str, ylabel: str) -> Path:
    """Grouped bars: ``groups[series][category]`` (e.g. MMLU accuracy by category for each model, or
    pairwise win rates), one colour per series."""
    series = [k for k, v in groups.items() if v]
    if not series:
        raise ValueError(f"nothing to plot for {path}")
    categories = list(dict.fromkeys(c for k in series for c in groups[k]))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(categories) * max(1, len(series)) / 2), 3.5))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        xs = [j + i * width for j in range(len(categories))]
        ax.bar(xs, [groups[name].get(c, math.nan) for c in categories], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(categories))])
    ax.set_xticklabels(categories, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _value(row: dict[str, Any], key: str) -> float:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and v is not None else math.nan


def plot_metrics_vs_gamma(rows: Sequence[dict[str, Any]], path: Path, partner: str = "sft") -> Path:
    """One panel per metric: merged models against gamma, the partner and coarse rows as reference lines."""
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
        for name, style in ((partner, ":"), ("coarse", "--")):
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
