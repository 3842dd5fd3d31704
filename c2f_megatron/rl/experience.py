"""The batch that flows between the PPO workers, and how advantages and returns are made from it.

``Experience`` holds named tensors for ``b`` sequences in the rollout layout ``[left pad | prompt (P) |
response (R) | right pad]``: every per-token tensor is ``[b, R]`` and aligned with the response tokens, so
response token ``j`` sits at column ``P + j`` of ``tokens`` and its logits/values at slot ``P + j - 1``.
Fields are filled in order by the workers (rollout -> log-probs/values/scores -> ``finalize``); the PPO
update reads slices (``select``, ``split``). The math is ``core_algos``; this module only wires it.

Data parallelism: after the rollout, the actor's data-parallel ranks exchange their rows
(``gather_experience``), so every rank holds the whole iteration's batch; each role then works on its
own data-parallel slice (``dp_shard``) and gathers its results back (``gather_rows``). Roles may have
different DP sizes (their own TP/PP), and batch statistics (whitening, logged means) are plain functions
of the whole batch, the same on every rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from c2f_megatron.engine.rows import gather_rows
from c2f_megatron.generation.rollout import RolloutBatch, padded_causal_mask
from c2f_megatron.platform.role_layout import RoleLayout
from c2f_megatron.rl import core_algos

if TYPE_CHECKING:
    from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class Experience:
    tokens: Tensor  # [b, P+R] long
    prompt_mask: Tensor  # [b, P] bool
    response_mask: Tensor  # [b, R] bool
    hit_limit: Tensor  # [b] bool: cut by the length limit
    rollout_logprobs: Tensor | None = None  # [b, R] as sampled (a check on the recomputed old_logprobs)
    old_logprobs: Tensor | None = None  # [b, R] actor, before the update
    entropy: Tensor | None = None  # [b, R] actor's entropy per position (logged)
    eos_mass: Tensor | None = None  # [b, R] actor's mass on the suppressed ids, before suppression (logged)
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

    def sequence_mask(self) -> Tensor:
        """[b, P+R] bool: real (prompt or response) tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def attention_mask(self) -> Tensor:
        """[b, 1, S, S] bool (True = masked): causal plus padding keys, as during the rollout."""
        return padded_causal_mask(~self.sequence_mask())

    def select(self, rows: Tensor) -> Experience:
        return Experience(**{k: None if v is None else v[rows] for k, v in self._fields().items()})

    def dp_shard(self, dp_rank: int, dp_size: int) -> Experience:
        """Rows ``[rank * b/dp, (rank+1) * b/dp)``: one data-parallel rank's contiguous slice."""
        if len(self) % dp_size:
            raise ValueError(f"{len(self)} rows do not split over {dp_size} data-parallel ranks")
        if dp_size == 1:
            return self
        per = len(self) // dp_size
        return self.select(torch.arange(dp_rank * per, (dp_rank + 1) * per, device=self.tokens.device))

    def split(self, size: int) -> list[Experience]:
        """Consecutive slices of ``size`` rows (micro-batches)."""
        if len(self) % size:
            raise ValueError(f"{len(self)} rows do not split into micro-batches of {size}")
        return [self.select(torch.arange(i, i + size)) for i in range(0, len(self), size)]

    # ------------------------------------------------------------------ as a model micro-batch
    @property
    def rows(self) -> Experience:
        """The rows the per-row math reads (``engine.rows``' micro-batch protocol)."""
        return self

    def model_inputs(self) -> tuple[Tensor, Tensor, None]:
        """What the model runs on: the padded rows, their mask, no packed-sequence parameters."""
        return self.tokens, self.attention_mask(), None

    def output_positions(self) -> Tensor:
        """The sequence positions whose output the per-row math reads: slots ``P - 1 .. P + R - 1``."""
        p, r = self.prompt_width, self.response_width
        return torch.arange(p - 1, p + r, device=self.tokens.device)

    def output_rows(self, output: Tensor, selected: bool = False) -> Tensor:
        """``[b, R + 1, ...]`` of a model output ``[b, P + R, ...]`` (or, ``selected``, of the output at
        ``output_positions()`` only): column ``j`` is slot ``P + j - 1``, the output before response token
        ``j`` (column ``R``: at the last slot). A view."""
        if selected:
            return output
        p, r = self.prompt_width, self.response_width
        return output[:, p - 1 : p + r]

    def micro_batches(self, rows: int, pack: bool = False, max_tokens: int | None = None) -> list:
        """The forward's micro-batches: ``split(rows)``, or with ``pack`` consecutive rows packed without
        their padding into sequences of at most ``max_tokens`` real tokens (default ``rows`` x the padded
        width, the tokens one padded micro-batch holds); a row longer than that is a micro-batch alone."""
        if not pack:
            return self.split(rows)
        budget = max_tokens or rows * self.tokens.shape[1]
        real = self.sequence_lengths().tolist()
        out, start, used = [], 0, 0
        for i, n in enumerate(real):
            if i > start and used + n > budget:
                out.append(PackedRows.of(self.select(torch.arange(start, i))))
                start, used = i, 0
            used += n
        out.append(PackedRows.of(self.select(torch.arange(start, len(self)))))
        return out

    def sequence_lengths(self) -> Tensor:
        """[b] real tokens per row (prompt and response)."""
        return self.prompt_mask.long().sum(-1) + self.response_lengths

    def _fields(self) -> dict[str, Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"experience is missing {missing}; run the workers that fill them first")


@dataclass
class PackedRows:
    """Rows of an ``Experience`` packed into one sequence without padding (verl's remove-padding): each
    row's real tokens one after the other, in megatron's THD format (``PackedSeqParams``: each row attends
    causally within itself, its RoPE positions start at 0). RoPE is relative, so the positions' shift
    against the padded layout changes log-probs and values by float rounding only.

    ``tokens`` [1, N]; ``segment`` [N]: the row of each token; ``window`` [b, R + 1]: the packed index of
    each row's slots ``P - 1 .. P + R - 1`` (``Experience.output_rows``), slots past a row's end read its
    last token (masked by ``response_mask`` wherever they are used).
    """

    rows: Experience
    tokens: Tensor
    segment: Tensor
    window: Tensor

    @classmethod
    def of(cls, rows: Experience) -> PackedRows:
        real = rows.sequence_mask()
        lengths = real.long().sum(-1)
        offsets = torch.cumsum(lengths, 0) - lengths
        first_slot = rows.prompt_width - rows.prompt_mask.long().sum(-1)  # slot of each row's first token
        slots = rows.prompt_width - 1 + torch.arange(rows.response_width + 1, device=rows.tokens.device)
        within = (slots[None, :] - first_slot[:, None]).clamp(max=(lengths - 1)[:, None])
        return cls(
            rows=rows,
            tokens=rows.tokens[real][None, :],
            segment=torch.repeat_interleave(torch.arange(len(rows), device=rows.tokens.device), lengths),
            window=offsets[:, None] + within,
        )

    def __len__(self) -> int:
        return len(self.rows)

    def model_inputs(self) -> tuple[Tensor, None, PackedSeqParams]:
        """The packed sequence [1, N], no mask, and megatron's ``PackedSeqParams`` (THD): each row's
        tokens attend causally to their own row only, and RoPE positions restart at each row."""
        from megatron.core.packed_seq_params import PackedSeqParams

        lengths = torch.bincount(self.segment, minlength=len(self.rows))
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=self.tokens.device)
        cu[1:] = torch.cumsum(lengths, 0)
        longest = int(lengths.max())
        params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
        )
        return self.tokens, None, params

    def output_positions(self) -> Tensor:
        """The packed positions whose output the per-row math reads (``window``, row by row)."""
        return self.window.flatten()

    def output_rows(self, output: Tensor, selected: bool = False) -> Tensor:
        """``[b, R + 1, ...]`` of the packed output ``[1, N, ...]`` (or, ``selected``, of the output at
        ``output_positions()`` only), as ``Experience.output_rows``."""
        if selected:
            return output[0].view(*self.window.shape, *output.shape[2:])
        return output[0, self.window]


def _pad(x: Tensor, left: int, right: int, value: float | int | bool) -> Tensor:
    if not left and not right:
        return x
    return torch.nn.functional.pad(
        x if x.dtype != torch.bool else x.to(torch.uint8), (left, right), value=value
    ).to(x.dtype)


def gather_experience(exp: Experience, layout: RoleLayout, pad_id: int) -> Experience:
    """The rollout rows of all data-parallel ranks of ``layout``, in rank order, on every rank.

    Ranks pad their prompts (left) and responses (right) to the widest of the group first; extra left
    padding is masked like the rollout's own, so log-probs and values do not change.
    """
    if layout.dp == 1:
        return exp
    widths = torch.tensor([exp.prompt_width, exp.response_width], device=exp.tokens.device)
    torch.distributed.all_reduce(widths, op=torch.distributed.ReduceOp.MAX, group=layout.dp_group)
    left, right = int(widths[0]) - exp.prompt_width, int(widths[1]) - exp.response_width
    fields = {
        "tokens": _pad(exp.tokens, left, right, pad_id),
        "prompt_mask": _pad(exp.prompt_mask, left, 0, False),
        "response_mask": _pad(exp.response_mask, 0, right, False),
        "hit_limit": exp.hit_limit,
        "rollout_logprobs": None
        if exp.rollout_logprobs is None
        else _pad(exp.rollout_logprobs, 0, right, 0.0),
    }
    return Experience(**{k: None if v is None else gather_rows(v, layout) for k, v in fields.items()})


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
    """Per-token KL, token rewards (score at the last generated token), GAE and whitened advantages."""
    exp.require("old_logprobs", "ref_logprobs", "values", "scores")
    mask = exp.response_mask
    exp.kl = torch.where(mask, core_algos.kl_penalty(exp.old_logprobs, exp.ref_logprobs, kl_estimator), 0.0)
    exp.token_rewards = core_algos.compute_token_rewards(exp.scores, exp.kl, kl_coef, mask)
    advantages, exp.returns = core_algos.compute_gae(exp.token_rewards, exp.values, mask, gamma, lam)
    exp.advantages = core_algos.masked_whiten(advantages, mask) if whiten else advantages
    return exp


# The EOS mass profile: the response positions in this many equal buckets (``eos_mass_pos_<k>``).
EOS_MASS_BUCKETS = 8


def _token_stats(name: str, x: Tensor, mask: Tensor) -> dict[str, float]:
    """``<name>_mean/_std/_min/_max`` of ``x`` over the valid tokens (population std)."""
    v = x.double()[mask.bool()]
    return {
        f"{name}_mean": float(v.mean()),
        f"{name}_std": float(v.var(unbiased=False).clamp_min(0).sqrt()),
        f"{name}_min": float(v.min()),
        f"{name}_max": float(v.max()),
    }


def experience_metrics(exp: Experience) -> dict[str, float]:
    """Batch statistics of the whole iteration's batch: rewards, KL, entropy, lengths, value fit,
    advantages and returns, and the EOS mass (mean, max and its profile over the response positions)."""
    mask = exp.response_mask
    m = mask.double()
    lengths = exp.response_lengths.double()
    scores, raw = exp.scores.double(), exp.raw_scores.double()
    n, tok = float(len(exp)), float(m.sum())
    returns, values = exp.returns.double() * m, exp.values.double() * m
    r, v = float(returns.sum()), float(values.sum())
    var_r = float((returns**2).sum()) / tok - (r / tok) ** 2
    mean_err = (r - v) / tok
    var_err = float(((returns - values) ** 2).sum()) / tok - mean_err**2
    lp_diff = 0.0
    if exp.rollout_logprobs is not None:
        lp_diff = float(((exp.old_logprobs.double() - exp.rollout_logprobs.double()).abs() * m).sum())
    kl = float((exp.kl.double() * m).sum())
    out = {
        "reward_mean": float(scores.mean()),
        "reward_std": float(scores.var(unbiased=False).clamp_min(0).sqrt()),
        "reward_raw_mean": float(raw.mean()),
        "reward_raw_min": float(raw.min()),
        "reward_raw_max": float(raw.max()),
        # the sum of each response's token rewards (score - KL penalty), mean over responses
        "penalized_reward_mean": float((exp.token_rewards.double() * m).sum()) / n,
        "kl": kl / tok,  # per token
        "kl_per_seq": kl / n,  # nats per response: the adaptive controller's unit
        "entropy": float((exp.entropy.double() * m).sum()) / tok if exp.entropy is not None else 0.0,
        "response_length_mean": float(lengths.mean()),
        "response_length_min": float(lengths.min()),
        "response_length_max": float(lengths.max()),
        "hit_limit_frac": float(exp.hit_limit.double().mean()),
        **_token_stats("values", exp.values, mask),
        **_token_stats("returns", exp.returns, mask),
        **_token_stats("advantages", exp.advantages, mask),
        "explained_var": 1.0 - var_err / max(var_r, 1e-8),
        # |recomputed - sampled| log-prob per token: ~0 unless top-k/top-p are on (not recomputed)
        "rollout_logprob_diff": lp_diff / tok,
    }
    if exp.eos_mass is not None:
        mass = exp.eos_mass.double()
        out["eos_mass_mean"] = float((mass * m).sum()) / tok
        out["eos_mass_max"] = float(torch.where(mask, mass, 0.0).max())
        means, counts = core_algos.masked_bucket_means(mass, mask, EOS_MASS_BUCKETS)
        out.update({f"eos_mass_pos_{k}": float(means[k]) for k in range(EOS_MASS_BUCKETS) if counts[k] > 0})
    return out
