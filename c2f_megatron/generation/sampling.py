"""Next-token sampling as pure functions over a [b, vocab] logits tensor.

The order is fixed and matters: padded-vocab columns and suppressed ids are set to -inf *before*
temperature, top-k and top-p, so a suppressed id (EOS in coarse mode) can never be sampled and never takes
a slot of the top-k / nucleus set. Every function works on a vocab slice too (``vocab_start``), so the PPO
trainer can apply the same suppression to TP-sharded logits when it recomputes the policy's log-probs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def suppress_ids(logits: Tensor, ids: Sequence[int], vocab_start: int = 0, inplace: bool = False) -> Tensor:
    """``logits`` with the global ids ``ids`` set to -inf (ids outside this vocab slice ignored); a copy
    unless ``inplace`` (for a caller that owns ``logits``)."""
    local = [i - vocab_start for i in ids if 0 <= i - vocab_start < logits.shape[-1]]
    if not local:
        return logits
    if not inplace:
        logits = logits.clone()
    logits[..., local] = float("-inf")
    return logits


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature``; ``temperature`` must be > 0 (use greedy decoding for 0)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use greedy=True for argmax")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits per row (ties with the k-th are kept), -inf elsewhere; 0 = no-op."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability sums to >= ``p``.

    A token is kept when the probability mass strictly before it (in descending order) is < ``p``, so the
    most likely token is always kept and the set is never empty. ``p >= 1`` is a no-op.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: Tensor,
    true_vocab_size: int,
    suppressed: Sequence[int] = (),
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> Tensor:
    """The float32 logits whose softmax is the distribution actually sampled from.

    Vocab padding is cut off first (so draws do not depend on how far TP padded the vocab), then
    ``suppressed`` ids, then (unless ``greedy``) temperature, top-k and top-p.
    """
    logits = logits.float()[..., :true_vocab_size]
    logits = suppress_ids(logits, suppressed)
    if greedy:
        return logits
    logits = apply_temperature(logits, temperature)
    logits = top_k_filter(logits, top_k)
    return top_p_filter(logits, top_p)


def sample_tokens(
    processed_logits: Tensor,
    greedy: bool = False,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one token per row from ``process_logits`` output; returns (tokens [b], their log-probs [b]).

    Greedy is argmax (first index on ties). Sampling draws with ``generator`` so that ranks holding the
    same logits and the same generator state draw the same tokens; a list of generators (one per row) makes
    each row's draws independent of which other rows share its batch (data-parallel splits).
    """
    if torch.isneginf(processed_logits).all(dim=-1).any():
        raise ValueError("every token of a row is masked (suppressed ids cover the whole vocab?)")
    log_probs = torch.log_softmax(processed_logits, dim=-1)
    if greedy:
        tokens = processed_logits.argmax(dim=-1)
    elif isinstance(generator, Sequence):
        if len(generator) != log_probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {log_probs.shape[0]} rows")
        probs = log_probs.exp()
        tokens = torch.cat(
            [torch.multinomial(probs[i], num_samples=1, generator=g) for i, g in enumerate(generator)]
        )
    else:
        tokens = torch.multinomial(log_probs.exp(), num_samples=1, generator=generator).squeeze(-1)
    return tokens, log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
