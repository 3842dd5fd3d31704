"""Response metrics against hand computations."""

from __future__ import annotations

import math

import pytest

from c2f_megatron.eval.response_metrics import (
    distinct_n,
    eos_fraction,
    ngrams,
    perplexity,
    redundancy,
    response_metrics,
    summarize,
    win_rate,
)


def test_redundancy_is_share_of_repeated_ngrams():
    # 3-grams of 1 2 3 1 2 3 1: (123) (231) (312) (123) (231) -> 5 total, 3 unique -> 1 - 3/5.
    assert redundancy([1, 2, 3, 1, 2, 3, 1], 3) == pytest.approx(0.4)
    assert redundancy([7, 7, 7, 7], 1) == pytest.approx(0.75)
    assert redundancy([1, 2, 3, 4], 2) == 0.0
    assert redundancy([1, 2], 3) == 0.0  # shorter than n: no n-grams, nothing repeated
    with pytest.raises(ValueError):
        ngrams([1], 0)


def test_distinct_n_pools_all_responses():
    rs = [[1, 2, 1, 2], [2, 1]]
    # bigrams: (1,2) (2,1) (1,2) | (2,1) -> 4 total, 2 unique; unigrams: 6 total, 2 unique.
    assert distinct_n(rs, 2) == pytest.approx(0.5)
    assert distinct_n(rs, 1) == pytest.approx(1 / 3)
    assert distinct_n([[1]], 2) == 0.0


def test_eos_fraction_and_perplexity():
    assert eos_fraction([[5, 2], [5], [2], []], eos_id=2) == pytest.approx(0.5)
    lp = [[math.log(0.5), math.log(0.25)], [math.log(0.5)]]
    assert perplexity(lp) == pytest.approx(2 ** (4 / 3))  # exp(-(ln.5 + ln.25 + ln.5) / 3)
    with pytest.raises(ValueError):
        perplexity([[]])


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 2.0, 3.0], [1.0, 3.0, 0.0]) == pytest.approx(0.5)
    assert win_rate([2.0], [1.0]) == 1.0
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0], [1.0, 2.0])


def test_summarize_and_response_metrics():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert (s.mean, s.min, s.max, s.n) == (2.5, 1.0, 4.0, 4)
    assert s.std == pytest.approx(math.sqrt(5 / 3)) and s.stderr == pytest.approx(math.sqrt(5 / 3) / 2)

    rs = [[4, 4, 4, 4, 2], [5, 6, 7]]
    m = response_metrics(rs, eos_id=2, rewards=[0.5, -0.5], redundancy_n=2)
    assert m.length.mean == 4.0 and m.eos_fraction == 0.5
    # bigrams of r0: (44)(44)(44)(42) -> 1 - 2/4; r1: (56)(67) -> 0.
    assert m.redundancy.mean == pytest.approx(0.25)
    assert m.distinct_1 == pytest.approx(5 / 8) and m.distinct_2 == pytest.approx(4 / 6)
    assert m.reward is not None and m.reward.mean == 0.0
    with pytest.raises(ValueError, match="rewards"):
        response_metrics(rs, eos_id=2, rewards=[1.0])
