"""Sampling functions against direct references (no model, no distributed state)."""

from __future__ import annotations

import math

import pytest
import torch

from c2f_megatron.generation.sampling import (
    apply_temperature,
    process_logits,
    sample_tokens,
    suppress_ids,
    top_k_filter,
    top_p_filter,
)

NEG = float("-inf")


def test_suppress_ids_sets_only_those_ids_and_respects_the_vocab_slice() -> None:
    logits = torch.arange(12.0).view(2, 6)
    out = suppress_ids(logits, [1, 4])
    assert torch.isneginf(out[:, [1, 4]]).all()
    keep = [0, 2, 3, 5]
    assert torch.equal(out[:, keep], logits[:, keep])
    assert not torch.isneginf(logits).any()  # input untouched
    # A TP shard holding global ids 6..11: global id 8 is local column 2; id 1 is not in this shard.
    shard = suppress_ids(logits, [1, 8], vocab_start=6)
    assert torch.isneginf(shard[:, 2]).all() and torch.isneginf(shard).sum() == 2


def test_temperature_divides_and_rejects_non_positive() -> None:
    logits = torch.tensor([[2.0, -4.0]])
    assert torch.equal(apply_temperature(logits, 2.0), torch.tensor([[1.0, -2.0]]))
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, 0.0)


def test_top_k_keeps_the_k_largest() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=g)
    out = top_k_filter(logits, 7)
    for row, filtered in zip(logits, out):
        kept = set(torch.nonzero(~torch.isneginf(filtered)).flatten().tolist())
        assert kept == set(torch.argsort(row, descending=True)[:7].tolist())
        assert torch.equal(filtered[list(kept)], row[list(kept)])
    assert torch.equal(top_k_filter(logits, 0), logits)


def _reference_nucleus(row: torch.Tensor, p: float) -> set[int]:
    """Smallest prefix of the descending-probability order whose mass reaches p."""
    probs = torch.softmax(row.double(), -1)
    order = torch.argsort(probs, descending=True).tolist()
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i].item()
        if mass >= p:
            break
    return set(kept)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(p: float) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 40, generator=g) * 2
    out = top_p_filter(logits, p)
    for row, filtered in zip(logits, out):
        kept = set(torch.nonzero(~torch.isneginf(filtered)).flatten().tolist())
        assert kept == _reference_nucleus(row, p)
        assert kept  # never empty


def test_top_p_never_empty_and_one_is_a_no_op() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    assert (~torch.isneginf(top_p_filter(logits, 1e-6))).sum() == 1
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    with pytest.raises(ValueError):
        top_p_filter(logits, 0.0)


def test_suppression_happens_before_top_k_and_top_p() -> None:
    # id 0 dominates; suppressed, it must not take the only top-k slot nor the whole nucleus.
    logits = torch.tensor([[20.0, 3.0, 2.0, 1.0]])
    out = process_logits(logits, true_vocab_size=4, suppressed=[0], top_k=1)
    assert torch.nonzero(~torch.isneginf(out[0])).flatten().tolist() == [1]
    out = process_logits(logits, true_vocab_size=4, suppressed=[0], top_p=0.5)
    assert torch.nonzero(~torch.isneginf(out[0])).flatten().tolist() == [1]


def test_padded_vocab_columns_are_never_sampled() -> None:
    logits = torch.zeros(64, 8)
    logits[:, 5:] = 50.0  # padding columns 5..7 would win every draw
    processed = process_logits(logits, true_vocab_size=5)
    tokens, _ = sample_tokens(processed, generator=torch.Generator().manual_seed(0))
    assert int(tokens.max()) < 5
    greedy, _ = sample_tokens(process_logits(logits, 5, greedy=True), greedy=True)
    assert int(greedy.max()) < 5


def test_greedy_is_argmax_and_sampling_matches_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    tokens, logp = sample_tokens(logits, greedy=True)
    assert tokens.tolist() == [0] and math.isclose(logp.item(), math.log(0.6), rel_tol=1e-5)
    many = logits.expand(30000, 3)
    drawn, logp = sample_tokens(many, generator=torch.Generator().manual_seed(3))
    freq = torch.bincount(drawn, minlength=3).float() / drawn.numel()
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.015)
    assert torch.allclose(logp, torch.log_softmax(logits, -1)[0, drawn], atol=1e-6)


def test_same_seed_same_tokens_and_different_seed_different_tokens() -> None:
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(4))
    a, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(7))
    b, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(7))
    c, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_all_masked_row_is_an_error() -> None:
    logits = torch.full((1, 4), NEG)
    with pytest.raises(ValueError, match="masked"):
        sample_tokens(logits)
