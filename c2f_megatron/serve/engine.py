"""The server's generation engine: one batch of request rows through ``generation.rollout.generate``.

A batch (``BatchSpec``) is rows that share one sampler configuration; each row (``RowSpec``) keeps its own
prompt, token limit, stop strings and seed, so a request's output does not depend on the rows it shares a
batch with (greedy: up to float rounding of the batch shape). Rows end at EOS, at their own ``max_tokens``,
or once their decoded text holds one of their stop strings; the batch runs until its last row ends.

Parallel layouts: every rank of the model's TP/PP group runs the same batch. Rank 0 (which serves HTTP)
broadcasts each ``BatchSpec`` over the world group (``broadcast_batch``); the others wait in
``follow_rank_zero`` until rank 0 sends ``None``. Every decision of a row (its limit, its stop strings) is
made from the tokens, which every rank holds alike, so the ranks never diverge; only rank 0 emits events.
An idle rank 0 sends a no-op batch every ``HEARTBEAT_S`` so that the others' collective never times out.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from c2f_megatron.eval.lm import StopStrings

HEARTBEAT_S = 60.0
NOOP = "noop"


@dataclass(frozen=True)
class RowSpec:
    prompt: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class BatchSpec:
    rows: list[RowSpec]
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    top_logprobs: int | None = None  # None: no log-probs; k: each token's and the k most likely

    @property
    def width(self) -> int:
        return max(len(r.prompt) for r in self.rows)

    @property
    def max_new_tokens(self) -> int:
        return max(r.max_tokens for r in self.rows)


@dataclass
class TokenEvent:
    """One generated token of one row, as rank 0 reports it while the batch runs."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class RowResult:
    ids: list[int]  # the response ids, EOS included when the row stopped there
    finish_reason: Literal["stop", "length"]


# emit(row, event): a TokenEvent while the row runs, then its RowResult
Emit = Callable[[int, Any], None]


def run_batch(lm: Any, spec: BatchSpec, emit: Emit | None = None) -> list[RowResult]:
    """Generate every row of ``spec`` with ``lm`` (an ``eval.megatron_model.MegatronLM``); call on every
    rank of its TP/PP group. ``emit`` (rank 0) sees each row's tokens as they come and then its result."""
    from c2f_megatron.generation.rollout import STOP_WINDOW, StepTokens, fine_generation_config, generate

    tokenizer = lm.tokenizer
    rows = spec.rows
    gen_cfg = fine_generation_config(
        tokenizer.eos_id,
        tokenizer.pad_id,
        spec.max_new_tokens,
        greedy=spec.greedy,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        top_logprobs=spec.top_logprobs,
    )
    stops = [StopStrings(tokenizer, r.stop) if r.stop else None for r in rows]
    generated: list[list[int]] = [[] for _ in rows]
    reasons: list[Literal["stop", "length"] | None] = [None] * len(rows)

    def on_step(step: StepTokens) -> list[int]:
        finish = []
        for i, active in enumerate(step.active):
            if not active:
                continue
            token = step.tokens[i]
            generated[i].append(token)
            if emit is not None:
                top = None
                if step.top_ids is not None and step.top_logprobs is not None:
                    top = list(zip(step.top_ids[i], step.top_logprobs[i]))
                emit(i, TokenEvent(token, step.logprobs[i] if step.logprobs else None, top))
            if token == tokenizer.eos_id:
                reasons[i] = "stop"  # generate() ends the row itself
            elif len(generated[i]) >= rows[i].max_tokens:
                reasons[i] = "length"
                finish.append(i)
            elif stops[i] is not None and stops[i](generated[i][-STOP_WINDOW:]):
                reasons[i] = "stop"
                finish.append(i)
        return finish

    result = generate(
        lm.chunk,
        lm.role.layout,
        [r.prompt for r in rows],
        gen_cfg,
        tokenizer.vocab_size,
        on_step=on_step,
        row_seeds=[r.seed for r in rows],
    )
    out = []
    for i, ids in enumerate(result.response_ids()):
        reason = reasons[i] or "length"
        out.append(RowResult(ids, reason))
        if emit is not None:
            emit(i, out[-1])
    return out


def broadcast_batch(spec: BatchSpec | str | None) -> BatchSpec | str | None:
    """Rank 0's next batch (a ``BatchSpec``, ``NOOP`` or ``None`` to stop) on every rank of the world."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return spec
    box = [spec]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow_rank_zero(lm: Any) -> None:
    """Ranks other than 0: run every batch rank 0 broadcasts, until it sends ``None``."""
    while True:
        spec = broadcast_batch(None)
        if spec is None:
            return
        if spec == NOOP:
            continue
        try:
            run_batch(lm, spec)
        except Exception:  # rank 0 fails the same batch and goes on serving: so do we
            traceback.print_exc(file=sys.stderr)
