"""The batch that flows between the PPO workers, and how advantages and returns are made from it.

``Experience`` holds named tensors for ``b`` sequences in the rollout layout ``[left pad | prompt (P) |
response (R) | right pad]``: every per-token tensor is ``[b, R]`` and aligned with the response tokens, so
response token ``j`` sits at column ``P + j`` of ``tokens`` and its logits/values at slot ``P + j - 1``.
Fields are filled in order by the workers (rollout -> log-probs/values/scores -> ``finalize``); the PPO
update reads slices (``select``, ``split``). The math is ``core_algos``; this module only wires it and
makes the batch statistics data-parallel (whitening and logged means over all DP ranks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from c2f_megatron.rl import core_algos
from c2f_megatron.rl.rollout import RolloutBatch, padded_causal_mask


@dataclass
class Experience:
    tokens: Tensor  # [b, P+R] long
    prompt_mask: Tensor  # [b, P] bool
    response_mask: Tensor  # [b, R] bool
    hit_limit: Tensor  # [b] bool: cut by the length limit
    rollout_logprobs: Tensor | None = None  # [b, R] as sampled (a check on the recomputed old_logprobs)
    old_logprobs: Tensor | None = None  # [b, R] actor, before the update
    entropy: Tensor | None = None  # [b, R] actor's entropy per position (logged)
    ref_logprobs: Tensor | None = None  # [b, R] frozen reference
    values: Tensor | None = None  # [b, R] critic, before the update
    raw_scores: Tensor | None = None  # [b] reward as returned (model or function)
    scores: Tensor | None = None  # [b] normalised and clipped: what PPO maximises
    kl: Tensor | None = None  # [b, R] per-token KL(actor || ref) estimate
    token_rewards: Tensor | None = None  # [b, R]
    advantages: Tensor | None = None  # [b, R]
    returns: Tensor | None = None  # [b, R]

    @classmethod
    def from_rollout(cls, rollout: RolloutBatch) -> Experience:
        return cls(
            rollout.tokens, rollout.prompt_mask, rollout.response_mask, rollout.hit_limit, rollout.logprobs
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def prompt_width(self) -> int:
        return self.prompt_mask.shape[1]

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.long().sum(-1)

    def attention_mask(self) -> Tensor:
        """[b, 1, S, S] bool (True = masked): causal plus padding keys, as during the rollout."""
        return padded_causal_mask(~torch.cat([self.prompt_mask, self.response_mask], dim=1))

    def select(self, rows: Tensor) -> Experience:
        return Experience(**{k: None if v is None else v[rows] for k, v in self._fields().items()})

    def split(self, size: int) -> list[Experience]:
        """Consecutive slices of ``size`` rows (micro-batches)."""
        if len(self) % size:
            raise ValueError(f"{len(self)} rows do not split into micro-batches of {size}")
        return [self.select(torch.arange(i, i + size)) for i in range(0, len(self), size)]

    def _fields(self) -> dict[str, Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"experience is missing {missing}; run the workers that fill them first")


def _dp_sum(values: list[Tensor]) -> list[Tensor]:
    """Sum scalars over the data-parallel group (one all-reduce); identity without DP."""
    from megatron.core import parallel_state as ps

    stacked = torch.stack([v.double().reshape(()) for v in values])
    if ps.model_parallel_is_initialized() and ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(stacked, group=ps.get_data_parallel_group())
    return list(stacked.unbind())


def dp_masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``core_algos.masked_whiten`` with the mean/variance of the valid tokens of *all* DP ranks."""
    m = mask.bool()
    xs = torch.where(m, x.double(), 0.0)
    total, sq, count = _dp_sum([xs.sum(), (xs * xs).sum(), m.sum()])
    mean = total / count.clamp_min(1)
    var = (sq / count.clamp_min(1) - mean * mean).clamp_min(0) * count / (count - 1).clamp_min(1)
    out = (x.double() - mean) * torch.rsqrt(var + eps)
    return torch.where(m, out, 0.0).to(x.dtype)


def normalize_scores(raw: Tensor, mean: float | None, std: float | None, clip: float | None) -> Tensor:
    """``(raw - mean) / std`` when both are given, then clipped to ``[-clip, clip]``."""
    scores = raw.float()
    if mean is not None and std is not None:
        scores = (scores - mean) / max(std, 1e-6)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def finalize(
    exp: Experience,
    kl_coef: float,
    kl_estimator: str,
    gamma: float,
    lam: float,
    whiten: bool,
) -> Experience:
    """Per-token KL, token rewards (score at the last generated token), GAE and (DP-)whitened advantages."""
    exp.require("old_logprobs", "ref_logprobs", "values", "scores")
    mask = exp.response_mask
    exp.kl = torch.where(mask, core_algos.kl_penalty(exp.old_logprobs, exp.ref_logprobs, kl_estimator), 0.0)
    exp.token_rewards = core_algos.compute_token_rewards(exp.scores, exp.kl, kl_coef, mask)
    advantages, exp.returns = core_algos.compute_gae(exp.token_rewards, exp.values, mask, gamma, lam)
    exp.advantages = dp_masked_whiten(advantages, mask) if whiten else advantages
    return exp


def experience_metrics(exp: Experience) -> dict[str, float]:
    """Batch statistics over all DP ranks: rewards, KL, entropy, lengths, value fit."""
    from megatron.core import parallel_state as ps

    mask = exp.response_mask
    m = mask.float()
    lengths = exp.response_lengths.double()
    rows = torch.tensor(float(len(exp)))
    sums = _dp_sum(
        [
            rows,
            exp.scores.double().sum(),
            (exp.scores.double() ** 2).sum(),
            exp.raw_scores.double().sum(),
            (exp.kl * m).sum(),
            m.sum(),
            (exp.entropy * m).sum() if exp.entropy is not None else torch.tensor(0.0),
            lengths.sum(),
            exp.hit_limit.double().sum(),
            (exp.values * m).sum(),
            (exp.returns * m).sum(),
            (((exp.returns - exp.values) * m) ** 2).sum(),
            ((exp.returns * m) ** 2).sum(),
            ((exp.old_logprobs - exp.rollout_logprobs).abs() * m).sum()
            if exp.rollout_logprobs is not None
            else torch.tensor(0.0),
        ]
    )
    n, s, s2, raw, kl, tok, ent, length, hit, v, r, err2, r2, lp_diff = (float(x) for x in sums)
    max_len = lengths.max().reshape(())
    if ps.model_parallel_is_initialized() and ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(
            max_len, op=torch.distributed.ReduceOp.MAX, group=ps.get_data_parallel_group()
        )
    var_r = r2 / tok - (r / tok) ** 2
    mean_err = (r - v) / tok
    var_err = err2 / tok - mean_err**2
    return {
        "reward_mean": s / n,
        "reward_std": max(s2 / n - (s / n) ** 2, 0.0) ** 0.5,
        "reward_raw_mean": raw / n,
        "kl": kl / tok,  # per token
        "kl_per_seq": kl / n,  # nats per response: the adaptive controller's unit
        "entropy": ent / tok,
        "response_length_mean": length / n,
        "response_length_max": float(max_len),
        "hit_limit_frac": hit / n,
        "values_mean": v / tok,
        "returns_mean": r / tok,
        "explained_var": 1.0 - var_err / max(var_r, 1e-8),
        # |recomputed - sampled| log-prob per token: ~0 unless top-k/top-p are on (not recomputed)
        "rollout_logprob_diff": lp_diff / tok,
    }
