"""Metrics over generated responses: length, EOS rate, redundancy, distinct-n, perplexity, RM win rate.

The paper's claim is about degenerate generation (over-long, repetitive, non-terminating responses) under
PPO, so these are the numbers that make it visible. All are pure functions of token ids / log-probs / scores;
the model-facing part (generating, scoring with the reward model) lives elsewhere.

Definitions (n-grams are contiguous windows of n token ids within one response):
- redundancy(r, n) = 1 - |unique n-grams of r| / |n-grams of r|  (0 for responses shorter than n);
- distinct_n(rs, n) = |unique n-grams over all rs| / |n-grams over all rs|  (Li et al. 2016; 0 if none);
- perplexity = exp(-sum of token log-probs / number of tokens), pooled over all responses;
- win_rate(a, b) = (#(a > b) + 0.5 #(a == b)) / #pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Tokens = Sequence[int]


def ngrams(tokens: Tokens, n: int) -> list[tuple[int, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def redundancy(tokens: Tokens, n: int = 3) -> float:
    """Share of a response's n-grams that repeat an earlier one: 1 - unique / total."""
    grams = ngrams(tokens, n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(responses: Sequence[Tokens], n: int = 2) -> float:
    """Unique n-grams across all responses over all n-grams (diversity of the set of responses)."""
    total = 0
    unique: set[tuple[int, ...]] = set()
    for r in responses:
        grams = ngrams(r, n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def ended_with_eos(tokens: Tokens, eos_id: int) -> bool:
    """Did generation stop by emitting EOS (rather than hitting the length limit)?"""
    return len(tokens) > 0 and tokens[-1] == eos_id


def eos_fraction(responses: Sequence[Tokens], eos_id: int) -> float:
    if not responses:
        raise ValueError("eos_fraction of no responses")
    return sum(ended_with_eos(r, eos_id) for r in responses) / len(responses)


def perplexity(token_logprobs: Sequence[Sequence[float]]) -> float:
    """Token-weighted perplexity of reference responses from their per-token log-probs (natural log)."""
    count = sum(len(lp) for lp in token_logprobs)
    if count == 0:
        raise ValueError("perplexity of zero tokens")
    return math.exp(-sum(sum(lp) for lp in token_logprobs) / count)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """How often A's reward beats B's on the same prompt; ties count half."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"win_rate needs paired scores, got {len(scores_a)} and {len(scores_b)}")
    if not scores_a:
        raise ValueError("win_rate of no pairs")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b))
    return wins / len(scores_a)


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation, standard error of the mean, min, max and count."""

    mean: float
    std: float
    stderr: float
    min: float
    max: float
    n: int


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("summarize of no values")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(mean, std, std / math.sqrt(n), min(values), max(values), n)


@dataclass(frozen=True)
class ResponseMetrics:
    length: Summary
    eos_fraction: float
    redundancy: Summary
    distinct_1: float
    distinct_2: float
    reward: Summary | None


def response_metrics(
    responses: Sequence[Tokens], eos_id: int, rewards: Sequence[float] | None = None, redundancy_n: int = 3
) -> ResponseMetrics:
    """All per-response metrics of one evaluation set (lengths count tokens, EOS included)."""
    if rewards is not None and len(rewards) != len(responses):
        raise ValueError(f"{len(rewards)} rewards for {len(responses)} responses")
    return ResponseMetrics(
        length=summarize([float(len(r)) for r in responses]),
        eos_fraction=eos_fraction(responses, eos_id),
        redundancy=summarize([redundancy(r, redundancy_n) for r in responses]),
        distinct_1=distinct_n(responses, 1),
        distinct_2=distinct_n(responses, 2),
        reward=summarize(list(rewards)) if rewards is not None else None,
    )
