"""One worker per PPO role, each with a narrow interface over an ``Experience`` (verl's layout).

- ``ActorWorker``: ``generate`` (rollout), ``compute_log_probs`` (log-probs, entropy and EOS mass of the
  response tokens), ``update`` (one optimizer step of the clipped policy loss).
- ``ReferenceWorker``: frozen policy, ``compute_log_probs``.
- ``CriticWorker``: ``compute_values``, ``update`` (clipped value loss).
- ``RewardModelWorker``: frozen value model read at the last generated token; ``TokenFrequencyReward``: a
  programmatic reward with the same ``score(exp) -> [b]`` interface (``RewardFunction``).

Every role is an ``engine.RoleModel`` on its own TP/PP (``platform.role_layout``) and lives on all ranks.
The experience is the same on every rank; ``engine.rows`` runs each role on its own data-parallel slice of
the rows and gathers the results back, so every rank ends up with the same ``[b, R]`` tensors again. A
worker holds only its role's math: which outputs it reads, its loss and its metrics. Log-probs are
TP-correct over the role's own TP group: the vocab-parallel log-softmax over logits with the padded vocab
and the suppressed ids masked and the sampling temperature applied, i.e. the distribution the rollout drew
from (top-k/top-p are not applied when recomputing, as in verl). Entropy is a vocab-parallel reduction too
(logged only), and so is the EOS mass (logged only): the probability the distribution *before* suppression
would put on the suppressed ids (EOS and the stop ids), from the same logits, one small reduction more.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from c2f_megatron.engine.role_model import RoleModel
from c2f_megatron.engine.rows import forward_rows, train_rows
from c2f_megatron.engine.schedule import StepResult
from c2f_megatron.generation.rollout import GenerationConfig, RolloutBatch, generate
from c2f_megatron.platform.role_layout import RoleLayout
from c2f_megatron.rl import core_algos
from c2f_megatron.rl.experience import Experience
from c2f_megatron.rl.vocab_parallel import (
    masked_ids_mass,
    vocab_parallel_columns,
    vocab_parallel_logprobs,
    vocab_parallel_logsumexp_entropy,
)

# --------------------------------------------------------------------------------------- TP-sharded math


def policy_logits(
    logits: Tensor, true_vocab_size: int, suppressed: Sequence[int], temperature: float, vocab_start: int
) -> Tensor:
    """This TP rank's slice of the sampling distribution's logits (fp32, a new tensor): padded vocab and
    suppressed ids at -inf, divided by the temperature. ``vocab_start``: global id of column 0."""
    from c2f_megatron.generation.sampling import suppress_ids
    from c2f_megatron.models.gpt import mask_padded_vocab

    z = logits.float() / temperature  # always a new tensor: mask it in place (no [b, R, V/tp] copies)
    z = mask_padded_vocab(z, true_vocab_size, vocab_start, inplace=True)
    return suppress_ids(z, suppressed, vocab_start, inplace=True)


def response_logprobs(
    logits: Tensor,
    mb: Experience,
    layout: RoleLayout,
    true_vocab_size: int,
    suppressed: Sequence[int],
    temperature: float,
    with_entropy: bool = False,
    with_eos_mass: bool = False,
) -> dict[str, Tensor]:
    """From the logits of a micro-batch's rows (``Experience.output_rows``: ``[b, R + 1, V/tp]``, column
    ``j`` before response token ``j``) sharded over ``layout``'s TP group, ``[b, R]`` each:
    ``logprobs`` of the response tokens (0 on padding); with ``with_entropy`` the sampling distribution's
    ``entropy`` (unmasked); with ``with_eos_mass`` and ids suppressed, ``eos_mass`` (0 on padding): the
    probability the distribution before suppression (same temperature) puts on the suppressed ids."""
    p, r = mb.prompt_width, mb.response_width
    start = layout.tp_rank * logits.shape[-1]
    group = layout.tp_group if layout.tp > 1 else None
    raw = logits[:, :r]
    z = policy_logits(raw, true_vocab_size, suppressed, temperature, start)
    labels = mb.tokens[:, p : p + r]
    # Padding after a response may hold a suppressed id (e.g. pad == EOS): read a harmless label there.
    safe = _first_allowed_id(true_vocab_size, suppressed)
    labels = torch.where(mb.response_mask, labels, safe)
    out: dict[str, Tensor] = {}
    eos_mass = with_eos_mass and bool(suppressed)
    if with_entropy or eos_mass:
        allowed_lse, entropy = vocab_parallel_logsumexp_entropy(z, group)
        if with_entropy:
            out["entropy"] = entropy
    if eos_mass:
        masked = vocab_parallel_columns(raw, suppressed, start, group) / temperature  # as policy_logits
        out["eos_mass"] = torch.where(mb.response_mask, masked_ids_mass(allowed_lse, masked), 0.0)
    logp = vocab_parallel_logprobs(z, labels, start, group)
    out["logprobs"] = torch.where(mb.response_mask, logp, 0.0)
    return out


def _first_allowed_id(true_vocab_size: int, suppressed: Sequence[int]) -> int:
    banned = set(suppressed)
    return next(i for i in range(true_vocab_size) if i not in banned)


def response_values(values: Tensor, mb: Experience) -> Tensor:
    """The critic's value of the state before each response token (``values``: the rows' output,
    ``[b, R + 1, 1]``), ``[b, R]``."""
    return torch.where(mb.response_mask, values[:, : mb.response_width, 0].float(), 0.0)


def last_generated_values(values: Tensor, mb: Experience) -> Tensor:
    """A value model's output at each row's last generated token (column ``len`` of the rows' output), ``[b]``."""
    return values[:, :, 0].float().gather(1, mb.response_lengths.view(-1, 1)).squeeze(1)


# ----------------------------------------------------------------------------------------------- workers


class PolicyScorer:
    """Log-probs of the response tokens under a policy: the sampling distribution (padded vocab and
    suppressed ids masked, temperature applied), as the actor and the reference both need."""

    def __init__(
        self,
        role: RoleModel,
        true_vocab_size: int,
        suppressed: Sequence[int],
        temperature: float,
        micro_batch_size: int,
        pack: bool = False,
    ):
        self.role = role
        self.true_vocab_size = true_vocab_size
        self.suppressed = list(suppressed)
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.pack = pack  # padding-free micro-batches (``Experience.micro_batches``)

    @property
    def layout(self) -> RoleLayout:
        return self.role.layout

    def logprobs(
        self, output: Tensor, mb: Experience, with_entropy: bool, with_eos_mass: bool = False
    ) -> dict[str, Tensor]:
        return response_logprobs(
            output,
            mb,
            self.layout,
            self.true_vocab_size,
            self.suppressed,
            self.temperature,
            with_entropy,
            with_eos_mass,
        )


class ActorWorker(PolicyScorer):
    """The trained policy: rollouts, log-probs of its own samples, and clipped-policy-loss updates."""

    def generate(self, prompts: list[list[int]], gen_cfg: GenerationConfig, row_offset: int) -> RolloutBatch:
        """Roll out this rank's ``prompts``; ``row_offset``: their position in the iteration's batch (the
        sampling seed of each row), so the draws do not depend on the data-parallel split."""
        return generate(self.role.module, self.layout, prompts, gen_cfg, self.true_vocab_size, row_offset)

    def _logprobs(self, output: Tensor, mb: Experience) -> dict[str, Tensor]:
        out = self.logprobs(output, mb, with_entropy=True, with_eos_mass=True)
        out["entropy"] = torch.where(mb.response_mask, out["entropy"], 0.0)
        return out

    def compute_log_probs(self, exp: Experience) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(logprobs, entropy, eos_mass)`` of the rollout, ``[b, R]`` each; ``eos_mass`` is None when no
        id is suppressed (plain PPO)."""
        r = exp.response_width
        shapes = {"logprobs": (r,), "entropy": (r,)} | ({"eos_mass": (r,)} if self.suppressed else {})
        out = forward_rows(self.role, exp, self.micro_batch_size, self._logprobs, shapes, self.pack)
        return out["logprobs"], out["entropy"], out.get("eos_mass")

    def _loss(self, clip_eps: float, mb: Experience, output: Tensor):
        out = self.logprobs(output, mb, with_entropy=True)
        logp, ent = out["logprobs"], out["entropy"]
        loss, stats = core_algos.policy_loss(
            logp, mb.old_logprobs, mb.advantages, mb.response_mask, clip_eps, agg="token-sum"
        )
        n = mb.response_mask.sum()
        nf = n.float()
        metrics = {k: torch.stack([stats[k] * nf, nf]) for k in ("pg_loss", "pg_clipfrac", "approx_kl")}
        metrics["entropy"] = torch.stack([(ent * mb.response_mask).sum(), nf])
        return loss, n.to(torch.int), metrics

    def update(self, mini: Experience, clip_eps: float) -> StepResult:
        """One optimizer step on the minibatch ``mini`` (all its rows, the same on every rank)."""
        loss = partial(self._loss, clip_eps)
        return train_rows(self.role, mini, self.micro_batch_size, loss, "pg_loss", self.pack)


class ReferenceWorker(PolicyScorer):
    """The frozen initial policy, on its own layout; its log-probs anchor the KL penalty."""

    def _logprobs(self, output: Tensor, mb: Experience) -> dict[str, Tensor]:
        return self.logprobs(output, mb, with_entropy=False)

    def compute_log_probs(self, exp: Experience) -> Tensor:
        shapes = {"logprobs": (exp.response_width,)}
        return forward_rows(self.role, exp, self.micro_batch_size, self._logprobs, shapes, self.pack)[
            "logprobs"
        ]


class CriticWorker:
    """The value model, on its own layout: values of the states before each response token,
    clipped-value-loss updates."""

    def __init__(self, role: RoleModel, micro_batch_size: int, pack: bool = False):
        self.role = role
        self.micro_batch_size = micro_batch_size
        self.pack = pack

    def compute_values(self, exp: Experience) -> Tensor:
        def compute(output: Tensor, mb: Experience) -> dict[str, Tensor]:
            return {"values": response_values(output, mb)}

        shapes = {"values": (exp.response_width,)}
        return forward_rows(self.role, exp, self.micro_batch_size, compute, shapes, self.pack)["values"]

    def _loss(self, value_clip: float | None, mb: Experience, output: Tensor):
        values = response_values(output, mb)
        loss, stats = core_algos.value_loss(
            values, mb.values, mb.returns, mb.response_mask, value_clip, agg="token-sum"
        )
        n = mb.response_mask.sum()
        nf = n.float()
        metrics = {k: torch.stack([stats[k] * nf, nf]) for k in ("vf_loss", "vf_clipfrac", "vpred_mean")}
        return loss, n.to(torch.int), metrics

    def update(self, mini: Experience, value_clip: float | None) -> StepResult:
        """One optimizer step on the minibatch ``mini`` (all its rows, the same on every rank)."""
        loss = partial(self._loss, value_clip)
        return train_rows(self.role, mini, self.micro_batch_size, loss, "vf_loss", self.pack)


class RewardFunction(Protocol):
    """What the trainer asks of a reward: one raw score per sequence, ``[b]``, identical on all ranks."""

    mean: float | None  # normalisation statistics (None: not normalised)
    std: float | None

    def score(self, exp: Experience) -> Tensor: ...


class RewardModelWorker:
    """A frozen reward model (value checkpoint) read at the last generated token. ``mean``/``std`` are the
    RM's eval statistics from its checkpoint metadata (for normalisation), when it has them."""

    def __init__(
        self,
        role: RoleModel,
        micro_batch_size: int,
        mean: float | None,
        std: float | None,
        pack: bool = False,
    ):
        self.role = role
        self.micro_batch_size = micro_batch_size
        self.mean, self.std = mean, std
        self.pack = pack

    def score(self, exp: Experience) -> Tensor:
        def compute(output: Tensor, mb: Experience) -> dict[str, Tensor]:
            return {"score": last_generated_values(output, mb)}

        return forward_rows(self.role, exp, self.micro_batch_size, compute, {"score": ()}, self.pack)["score"]


class TokenFrequencyReward:
    """Programmatic reward: the fraction of response tokens equal to ``target`` (in [0, 1])."""

    mean: float | None = None
    std: float | None = None

    def __init__(self, target: int):
        self.target = target

    def score(self, exp: Experience) -> Tensor:
        responses = exp.tokens[:, exp.prompt_width :]
        hits = ((responses == self.target) & exp.response_mask).float().sum(-1)
        return hits / exp.response_lengths.clamp_min(1).float()
