"""One worker per PPO role, each with a narrow interface over an ``Experience`` (verl's layout).

- ``ActorWorker``: ``generate`` (rollout), ``compute_log_probs`` (log-probs + entropy of the response
  tokens), ``update`` (one optimizer step of the clipped policy loss).
- ``ReferenceWorker``: frozen policy, ``compute_log_probs``.
- ``CriticWorker``: ``compute_values``, ``update`` (clipped value loss).
- ``RewardModelWorker``: frozen value model read at the last generated token; ``TokenFrequencyReward``: a
  programmatic reward with the same ``score(exp) -> [b]`` interface (``RewardFunction``).

Every role lives on all ranks with its own TP/PP (``platform.role_layout``; the actor's is megatron's
global one, the rollout engine needs it). The experience is the same on every rank; each role takes its
own data-parallel slice of the rows, runs megatron's pipeline schedule over it (``forward_only=True`` for
inference), broadcasts what its last stage computed along its pipeline and gathers the rows back over its
data-parallel group, so every rank ends up with the same ``[b, R]`` tensors again. Log-probs are
TP-correct over the role's own TP group: the vocab-parallel log-softmax over logits with the padded vocab
and the suppressed ids masked and the sampling temperature applied, i.e. the distribution the rollout drew
from (top-k/top-p are not applied when recomputing, as in verl). Entropy is a vocab-parallel reduction too
(logged only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor

from c2f_megatron.platform.role_layout import RoleLayout
from c2f_megatron.rl import core_algos
from c2f_megatron.rl.experience import Experience, gather_rows
from c2f_megatron.rl.rollout import GenerationConfig, RolloutBatch, generate
from c2f_megatron.rl.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs
from c2f_megatron.training.loop import StepResult, TrainingModel, train_step

# --------------------------------------------------------------------------------------- TP-sharded math


def policy_logits(
    logits: Tensor, true_vocab_size: int, suppressed: Sequence[int], temperature: float, vocab_start: int
) -> Tensor:
    """This TP rank's slice of the sampling distribution's logits (fp32, a new tensor): padded vocab and
    suppressed ids at -inf, divided by the temperature. ``vocab_start``: global id of column 0."""
    from c2f_megatron.models.gpt import mask_padded_vocab
    from c2f_megatron.rl.sampling import suppress_ids

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
) -> tuple[Tensor, Tensor | None]:
    """Log-prob (and entropy) of each response token from full-sequence logits ``[b, P+R, V/tp]`` sharded
    over ``layout``'s TP group."""
    p, r = mb.prompt_width, mb.response_width
    start = layout.tp_rank * logits.shape[-1]
    group = layout.tp_group if layout.tp > 1 else None
    z = policy_logits(logits[:, p - 1 : p + r - 1], true_vocab_size, suppressed, temperature, start)
    labels = mb.tokens[:, p : p + r]
    # Padding after a response may hold a suppressed id (e.g. pad == EOS): read a harmless label there.
    safe = _first_allowed_id(true_vocab_size, suppressed)
    labels = torch.where(mb.response_mask, labels, safe)
    entropy = vocab_parallel_entropy(z, group) if with_entropy else None
    logp = vocab_parallel_logprobs(z, labels, start, group)
    return torch.where(mb.response_mask, logp, 0.0), entropy


def _first_allowed_id(true_vocab_size: int, suppressed: Sequence[int]) -> int:
    banned = set(suppressed)
    return next(i for i in range(true_vocab_size) if i not in banned)


def response_values(values: Tensor, mb: Experience) -> Tensor:
    """The critic's value of the state before each response token: slot ``P + j - 1``, ``[b, R]``."""
    p, r = mb.prompt_width, mb.response_width
    return torch.where(mb.response_mask, values[:, p - 1 : p + r - 1, 0].float(), 0.0)


def last_generated_values(values: Tensor, mb: Experience) -> Tensor:
    """A value model's output at each row's last generated token, ``[b]``."""
    index = mb.prompt_width + mb.response_lengths - 1
    return values[:, :, 0].float().gather(1, index.view(-1, 1)).squeeze(1)


# ---------------------------------------------------------------------------------- pipeline plumbing


def _model_forward(
    data_iterator: Any, model: torch.nn.Module, loss_func: Callable
) -> tuple[Tensor, Callable]:
    """megatron ``forward_step_func``: the model on an ``Experience`` micro-batch with its rollout mask."""
    from c2f_megatron.models.gpt import position_ids_for

    mb: Experience = next(data_iterator)
    output = model(mb.tokens, position_ids_for(mb.tokens), mb.attention_mask())
    return output, partial(loss_func, mb)


def _collect(compute: Callable[[Tensor, Experience], dict[str, Tensor]], mb: Experience, output: Tensor):
    """Forward-only ``loss_func``: no loss, the computed tensors ride in the 'reduced' slot."""
    out = {k: v.detach() for k, v in compute(output, mb).items()}
    zero = torch.zeros((), device=output.device)
    return zero, torch.ones((), dtype=torch.int, device=output.device), out


def forward_only(
    chunks: Sequence[torch.nn.Module],
    layout: RoleLayout,
    exp: Experience,
    micro_batch_size: int,
    compute: Callable[[Tensor, Experience], dict[str, Tensor]],
    shapes: dict[str, tuple[int, ...]],
) -> dict[str, Tensor]:
    """Run ``compute(output, micro_batch)`` over the whole batch ``exp`` (the same on every rank) through the
    pipeline schedule, forward only: each data-parallel rank of ``layout`` takes its slice of rows, the last
    stage's results are broadcast along the pipeline and gathered over data parallel, so every rank
    returns the results for all rows (per-row shapes ``shapes``)."""
    from c2f_megatron.platform.distributed import device
    from c2f_megatron.training.loop import run_schedule

    local = exp.dp_shard(layout.dp_rank, layout.dp)
    micro = local.split(micro_batch_size)
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            fwd = partial(_model_forward, loss_func=partial(_collect, compute))
            outputs = run_schedule(
                chunks, layout, fwd, micro, exp.tokens.shape[1], micro_batch_size, forward_only=True
            )
    finally:
        for c, mode in zip(chunks, modes):
            c.train(mode)
    result: dict[str, Tensor] = {}
    for key, row_shape in shapes.items():
        if layout.is_last_stage:
            value = torch.cat([o[key] for o in outputs]).float().contiguous()
        else:
            value = torch.empty([len(local), *row_shape], dtype=torch.float32, device=device())
        if layout.pp > 1:
            torch.distributed.broadcast(value, src=layout.last_stage_rank, group=layout.pp_group)
        result[key] = gather_rows(value, layout)
    return result


class FrozenChunks:
    """A frozen model's chunks on their layout; with ``offload`` (GPU only) the weights live on the CPU
    between uses."""

    def __init__(self, chunks: Sequence[torch.nn.Module], layout: RoleLayout, offload: bool):
        from c2f_megatron.platform.distributed import device

        self.chunks = list(chunks)
        self.layout = layout
        self.device = device()
        self.offload = offload and self.device.type != "cpu"
        for c in self.chunks:
            c.requires_grad_(False)
            c.eval()
        self._move("cpu")

    def _move(self, where: str | torch.device) -> None:
        if self.offload:
            for c in self.chunks:
                c.to(where)

    @contextlib.contextmanager
    def on_device(self):
        self._move(self.device)
        try:
            yield self.chunks
        finally:
            self._move("cpu")
            if self.offload:
                torch.cuda.empty_cache()

    def forward_only(
        self,
        exp: Experience,
        micro_batch_size: int,
        compute: Callable[[Tensor, Experience], dict[str, Tensor]],
        shapes: dict[str, tuple[int, ...]],
    ) -> dict[str, Tensor]:
        """``forward_only`` of these chunks on their layout, on the device only for the pass."""
        with self.on_device() as chunks:
            return forward_only(chunks, self.layout, exp, micro_batch_size, compute, shapes)


# ----------------------------------------------------------------------------------------------- workers


class PolicyScorer:
    """Log-probs of the response tokens under a policy: the sampling distribution (padded vocab and
    suppressed ids masked, temperature applied), as the actor and the reference both need."""

    def __init__(
        self, true_vocab_size: int, suppressed: Sequence[int], temperature: float, micro_batch_size: int
    ):
        self.true_vocab_size = true_vocab_size
        self.suppressed = list(suppressed)
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size

    def logprobs(self, layout: RoleLayout, output: Tensor, mb: Experience, with_entropy: bool):
        return response_logprobs(
            output, mb, layout, self.true_vocab_size, self.suppressed, self.temperature, with_entropy
        )


def _update_micro_batches(mini: Experience, layout: RoleLayout, micro_batch_size: int) -> list[Experience]:
    """This rank's micro-batches of a minibatch (the same rows on every rank): its data-parallel slice."""
    return mini.dp_shard(layout.dp_rank, layout.dp).split(micro_batch_size)


class ActorWorker(PolicyScorer):
    """The trained policy (on megatron's global layout, which the rollout engine uses): rollouts, log-probs
    of its own samples, and clipped-policy-loss updates."""

    def __init__(
        self,
        tm: TrainingModel,
        true_vocab_size: int,
        suppressed: Sequence[int],
        temperature: float,
        micro_batch_size: int,
    ):
        if len(tm.chunks) != 1:
            raise ValueError("the PPO actor needs one model chunk: virtual pipeline stages are not supported")
        if not tm.layout.is_global:
            raise ValueError("the PPO actor must be on megatron's global layout (the rollout engine uses it)")
        super().__init__(true_vocab_size, suppressed, temperature, micro_batch_size)
        self.tm = tm

    @property
    def layout(self) -> RoleLayout:
        return self.tm.layout

    @property
    def module(self) -> torch.nn.Module:
        """The bare GPTModel (the rollout drives megatron's inference wrapper over it)."""
        return self.tm.chunks[0].module

    def generate(self, prompts: list[list[int]], gen_cfg: GenerationConfig, row_offset: int) -> RolloutBatch:
        """Roll out this rank's ``prompts``; ``row_offset``: their position in the iteration's batch (the
        sampling seed of each row), so the draws do not depend on the data-parallel split."""
        return generate(self.module, prompts, gen_cfg, self.true_vocab_size, row_offset=row_offset)

    def _logprobs(self, output: Tensor, mb: Experience) -> dict[str, Tensor]:
        logp, ent = self.logprobs(self.layout, output, mb, with_entropy=True)
        return {"logprobs": logp, "entropy": torch.where(mb.response_mask, ent, 0.0)}

    def compute_log_probs(self, exp: Experience) -> tuple[Tensor, Tensor]:
        r = exp.response_width
        out = forward_only(
            self.tm.chunks,
            self.layout,
            exp,
            self.micro_batch_size,
            self._logprobs,
            {"logprobs": (r,), "entropy": (r,)},
        )
        return out["logprobs"], out["entropy"]

    def _loss(self, clip_eps: float, mb: Experience, output: Tensor):
        logp, ent = self.logprobs(self.layout, output, mb, with_entropy=True)
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
        micro = _update_micro_batches(mini, self.layout, self.micro_batch_size)
        fwd = partial(_model_forward, loss_func=partial(self._loss, clip_eps))
        return train_step(
            self.tm, fwd, micro, mini.tokens.shape[1], self.micro_batch_size, loss_key="pg_loss"
        )


class ReferenceWorker(PolicyScorer):
    """The frozen initial policy, on its own layout; its log-probs anchor the KL penalty."""

    def __init__(
        self,
        frozen: FrozenChunks,
        true_vocab_size: int,
        suppressed: Sequence[int],
        temperature: float,
        micro_batch_size: int,
    ):
        super().__init__(true_vocab_size, suppressed, temperature, micro_batch_size)
        self.frozen = frozen

    def _logprobs(self, output: Tensor, mb: Experience) -> dict[str, Tensor]:
        logp, _ = self.logprobs(self.frozen.layout, output, mb, with_entropy=False)
        return {"logprobs": logp}

    def compute_log_probs(self, exp: Experience) -> Tensor:
        out = self.frozen.forward_only(
            exp, self.micro_batch_size, self._logprobs, {"logprobs": (exp.response_width,)}
        )
        return out["logprobs"]


class CriticWorker:
    """The value model, on its own layout: values of the states before each response token,
    clipped-value-loss updates."""

    def __init__(self, tm: TrainingModel, micro_batch_size: int):
        self.tm = tm
        self.micro_batch_size = micro_batch_size

    def compute_values(self, exp: Experience) -> Tensor:
        out = forward_only(
            self.tm.chunks,
            self.tm.layout,
            exp,
            self.micro_batch_size,
            lambda output, mb: {"values": response_values(output, mb)},
            {"values": (exp.response_width,)},
        )
        return out["values"]

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
        micro = _update_micro_batches(mini, self.tm.layout, self.micro_batch_size)
        fwd = partial(_model_forward, loss_func=partial(self._loss, value_clip))
        return train_step(
            self.tm, fwd, micro, mini.tokens.shape[1], self.micro_batch_size, loss_key="vf_loss"
        )


class RewardFunction(Protocol):
    """What the trainer asks of a reward: one raw score per sequence, ``[b]``, identical on all ranks."""

    mean: float | None  # normalisation statistics (None: not normalised)
    std: float | None

    def score(self, exp: Experience) -> Tensor: ...


class RewardModelWorker:
    """A frozen reward model (value checkpoint) read at the last generated token. ``mean``/``std`` are the
    RM's eval statistics from its checkpoint metadata (for normalisation), when it has them."""

    def __init__(self, frozen: FrozenChunks, micro_batch_size: int, mean: float | None, std: float | None):
        self.frozen = frozen
        self.micro_batch_size = micro_batch_size
        self.mean, self.std = mean, std

    def score(self, exp: Experience) -> Tensor:
        out = self.frozen.forward_only(
            exp,
            self.micro_batch_size,
            lambda output, mb: {"score": last_generated_values(output, mb)},
            {"score": ()},
        )
        return out["score"]


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
