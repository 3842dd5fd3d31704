"""PNG plots of a pipeline run: each evaluation metric against gamma, grouped bars.

The paper's argument is visual: reward climbs while Continuous Maximization raises the length limit, and
the merged models trace a path between the partner (gamma 0) and the coarse actor (gamma 1); its Figure 2
is MMLU by category and its Figure 3 pairwise win rates (``plot_win_tie_loss``). matplotlib is imported lazily with the Agg
backend (no display); files are written to a temp path and renamed. The PPO curves live with the run
summary every PPO job ends with (``training/summary.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from c2f_megatron.training.summary import pyplot, save_figure

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


def plot_bars(
    groups: dict[str, dict[str, float]],
    path: Path,
    title: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Grouped bars: ``groups[series][category]`` (e.g. MMLU accuracy by category for each model, MT-Bench
    scores by category, rubric pass rates by criterion), one colour per series."""
    series = [k for k, v in groups.items() if v]
    if not series:
        raise ValueError(f"nothing to plot for {path}")
    categories = list(dict.fromkeys(c for k in series for c in groups[k]))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(categories) * max(1, len(series)) / 2), 3.5))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        xs = [j + i * width for j in range(len(categories))]
        ax.bar(xs, [groups[name].get(c, math.nan) for c in categories], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(categories))])
    ax.set_xticklabels(categories, fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_win_tie_loss(games: dict[str, dict[str, dict[str, int]]], path: Path, title: str) -> Path:
    """The paper's Figure 3: for each pairing (``games[pairing][category] = {"wins", "ties", "losses"}``),
    stacked horizontal bars of the win / tie / loss fractions per category, one panel per pairing."""
    pairings = [k for k, v in games.items() if v]
    if not pairings:
        raise ValueError(f"nothing to plot for {path}")
    plt = pyplot()
    height = max(len(games[k]) for k in pairings)
    fig, axes = plt.subplots(
        len(pairings), 1, figsize=(7, 0.35 * height * len(pairings) + 1.2), squeeze=False
    )
    parts = (("wins", "win", "tab:green"), ("ties", "tie", "tab:gray"), ("losses", "loss", "tab:red"))
    for ax, name in zip(axes.flat, pairings):
        cats = list(games[name])
        totals = [sum(games[name][c][k] for k, _, _ in parts) for c in cats]
        left = [0.0] * len(cats)
        for key, label, colour in parts:
            frac = [games[name][c][key] / t if t else 0.0 for c, t in zip(cats, totals)]
            ax.barh(cats, frac, left=left, color=colour, label=label)
            left = [a + b for a, b in zip(left, frac)]
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
    axes.flat[0].legend(fontsize=7, ncol=3, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    axes.flat[-1].set_xlabel("fraction of games (ties: inconsistent or tied verdicts)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return save_figure(fig, path)
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
    plt = pyplot()
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
        return save_figure(fig, path)
    finally:
        plt.close(fig)
