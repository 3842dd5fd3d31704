"""PPO math as pure functions over ``[batch, response_len]`` tensors and a response mask (verl's habit).

The mask is 1 on real response tokens (including a final EOS) and 0 on the padding after the end. A response
cut at the rollout length limit has no EOS but is still trained on (the paper trains on the cut responses);
every function here treats its last valid token as the end of the episode (see ``compute_gae``).

Nothing here knows about models, parallelism or the trainer: losses come back with detached 0-dim tensor
stats (no host sync), so the caller decides when to reduce and log them.
"""

from __future__ import annotations

from typing import Literal

import torch

KLKind = Literal["k1", "k2", "k3"]
LossAgg = Literal["token-mean", "token-sum", "seq-mean-token-mean"]
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")
LOSS_AGGS: tuple[str, ...] = ("token-mean", "token-sum", "seq-mean-token-mean")

# exp() of a log-ratio beyond this overflows fp32 long before it means anything; verl clamps the same way.
_MAX_LOG_RATIO = 20.0


# --------------------------------------------------------------------------------------------- masked stats


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the valid positions (``where``, so NaN/inf in padding cannot leak in)."""
    valid = torch.where(mask.bool(), x, torch.zeros_like(x))
    return valid.sum() if dim is None else valid.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid positions; 0 where there are none (an empty row adds nothing, not NaN)."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid positions; Bessel-corrected by default (like verl), 0 if < 2 valid."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum().to(x.dtype)
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1), torch.zeros_like(var))
    return var


def masked_bucket_means(
    x: torch.Tensor, mask: torch.Tensor, buckets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-position profile of ``x`` ``[batch, R]``: the mean over valid entries in each of ``buckets``
    equal slices of the positions (position ``t`` in bucket ``t * buckets // R``), and each bucket's count
    of valid entries (0: the bucket is empty, its mean 0)."""
    length = x.shape[-1]
    bucket = torch.arange(length, device=x.device) * buckets // length
    valid = mask.bool()
    sums = x.new_zeros(buckets).index_add_(0, bucket, torch.where(valid, x, torch.zeros_like(x)).sum(0))
    counts = x.new_zeros(buckets).index_add_(0, bucket, valid.to(x.dtype).sum(0))
    return sums / counts.clamp_min(1), counts


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` with the mean/unbiased variance of its valid tokens (the whole batch, not per row).

    Used for advantages: a per-batch scale makes the clip range mean the same thing whatever the reward
    scale. ``shift_mean=False`` keeps the original mean (only rescales). Padding comes back as exactly 0,
    so a later unmasked sum cannot pick up garbage.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: LossAgg = "token-mean") -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    ``token-mean``: every valid token of the minibatch weighs the same (the default: long responses are not
    down-weighted per token, which matters when the length limit keeps growing). ``token-sum``: the sum over
    valid tokens, for a caller that divides by a global token count itself (megatron's ``(loss_sum,
    num_tokens)`` contract across micro-batches). ``seq-mean-token-mean``: mean per response, then mean over
    responses with at least one valid token.
    """
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if mode == "token-sum":
        return masked_sum(loss_mat, mask)
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(loss_mat, mask, dim=-1)
        has_tokens = mask.bool().any(dim=-1)
        return masked_mean(per_seq, has_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGGS}")


# ---------------------------------------------------------------------------------------------- KL, rewards


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k3") -> torch.Tensor:
    """Per-token estimate of KL(actor || reference) from log-probs of the sampled tokens.

    With ``r = ref_logp - logp`` (tokens sampled from the actor): ``k1 = -r`` (unbiased, can be negative,
    high variance), ``k2 = r^2 / 2`` (biased, low variance), ``k3 = exp(r) - r - 1`` (unbiased,
    non-negative, low variance; Schulman's "approximating KL"). Not masked: the caller masks.
    """
    log_ratio = logp.float() - ref_logp.float()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        r = (-log_ratio).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(r) - r - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row, ``[batch]``; -1 for a row without any."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=-1)


def compute_token_rewards(
    score: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor
) -> torch.Tensor:
    """Per-token reward ``-kl_coef * kl``, plus the sequence score added at each response's last valid token.

    ``score`` is ``[batch]`` (the reward model's scalar per response). For a response cut at the length limit
    the last valid token is the last one generated, so it still receives its score. Padding gets 0. A row
    with no valid token would silently lose its score, so it raises instead.
    """
    last = last_valid_index(mask)
    if bool((last < 0).any()):
        raise ValueError("a response has no valid token; its reward-model score would be lost")
    rewards = torch.where(mask.bool(), -kl_coef * kl.float(), torch.zeros_like(kl, dtype=torch.float32))
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards


# -------------------------------------------------------------------------------------------- advantages


def compute_gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 0.95,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; returns ``(advantages, returns)``, both 0 on padding.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    ``V_{t+1}`` and ``A_{t+1}`` count as 0 past the last valid token: the episode ends with the response.
    That includes responses cut at the length limit (treated as terminal, not bootstrapped from the critic):
    the paper trains on cut responses with their reward-model score, and that score is the return of the
    episode as it was scored. ``returns = A + V`` (the critic's target).

    Defaults: ``gamma = 0.95`` is the paper's discount; ``lam = 0.95`` follows ICE-GRT/verl. Note that with
    these the terminal score reaches token ``t`` scaled by ``0.95^(L-t)`` in the return: the early tokens of
    a long response learn mostly through the critic's values. Set ``gamma = lam = 1`` for undiscounted GAE.

    Backward recursion over time, vectorised over the batch (one small op per position); fp32 throughout.
    """
    valid = mask.bool()
    rewards = torch.where(valid, token_rewards.float(), 0.0)
    vals = torch.where(valid, values.float(), 0.0)
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(batch)
    next_adv = rewards.new_zeros(batch)
    for t in range(length - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - vals[:, t]
        adv_t = torch.where(valid[:, t], delta + gamma * lam * next_adv, 0.0)
        advantages[:, t] = adv_t
        # A padding position resets the carry, so the next valid token to its left sees V = A = 0 after it.
        next_value, next_adv = vals[:, t], adv_t
    returns = torch.where(valid, advantages + vals, 0.0)
    return advantages, returns


# ------------------------------------------------------------------------------------------------- losses


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    agg: LossAgg = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`` reduced by ``agg``.

    Stats (detached 0-dim tensors, token means over valid tokens): ``pg_loss`` (the token mean, whatever
    ``agg``), ``pg_clipfrac`` (fraction of tokens where the clipped branch is the active one),
    ``approx_kl`` (``0.5 * mean((logp - old)^2)``), ``approx_kl_k3`` (k3 estimate of KL(old || new)),
    ``ratio_mean``, ``ratio_max``.
    """
    log_ratio = (logp.float() - old_logp.float()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss_mat = torch.maximum(unclipped, clipped)
    loss = agg_loss(loss_mat, mask, agg)
    with torch.no_grad():
        valid = mask.bool()
        stats = {
            "pg_loss": masked_mean(loss_mat, mask),
            "pg_clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
            "approx_kl_k3": masked_mean(torch.exp(log_ratio) - log_ratio - 1.0, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(valid, ratio, torch.zeros_like(ratio)).amax(),
        }
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[returns - values] / Var[returns]`` over valid tokens: 1 is a perfect critic, <= 0 useless."""
    var_returns = masked_var(returns.float(), mask)
    var_error = masked_var(returns.float() - values.float(), mask)
    return 1.0 - var_error / var_returns.clamp_min(1e-8)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
    agg: LossAgg = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped critic loss ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)`` reduced by ``agg``.

    The clip keeps one PPO epoch from moving a value further than ``c`` from the rollout's estimate (in
    reward units: set ``clip_range=None`` to disable). Stats (detached 0-dim tensors): ``vf_loss`` (token
    mean), ``vf_clipfrac`` (fraction of valid tokens where the clipped error is the larger one),
    ``vpred_mean``, ``explained_var``.
    """
    v = values.float()
    r = returns.float()
    unclipped = (v - r).square()
    if clip_range is None:
        clipped = unclipped
    else:
        old = old_values.float()
        clipped = (old + (v - old).clamp(-clip_range, clip_range) - r).square()
    loss_mat = 0.5 * torch.maximum(unclipped, clipped)
    loss = agg_loss(loss_mat, mask, agg)
    with torch.no_grad():
        stats = {
            "vf_loss": masked_mean(loss_mat, mask),
            "vf_clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "vpred_mean": masked_mean(v, mask),
            "explained_var": explained_variance(v.detach(), r, mask),
        }
    return loss, stats
