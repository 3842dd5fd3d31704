"""What every ``LanguageModel`` backend shares: how requests become ids, batches, and log-probabilities.

A backend (``megatron_model.MegatronLM``, ``hf_model.HFLanguageModel``) supplies only a full-vocabulary
forward over a right-padded batch and a greedy generator; scoring is written once here, so two backends
given the same weights score the same ids the same way:

- ``split_request``: ``[BOS] context`` ids and the continuation's ids as they tokenize inside the whole text
  (the tokens after the longest common prefix with the context's own ids);
- one full forward per right-padded batch (causal attention makes trailing padding invisible);
- requests whose continuation is a single token and whose context ids are equal share one sequence
  (MMLU's four answer letters: one forward instead of four);
- generation stops at EOS or, row by row, once the decoded text holds a stop string.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from c2f_megatron.data.tokenizer import Tokenizer
from c2f_megatron.eval.protocol import truncate_at_stop


@dataclass(frozen=True)
class Sampling:
    """How a backend picks each generated token: greedy, or sampled after temperature / top-k / top-p
    (``top_k`` 0 and ``top_p`` 1.0 turn those filters off)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


GREEDY = Sampling()


def split_request(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Ids of ``[BOS] context`` and of the continuation as it tokenizes inside the whole text."""
    bos = tokenizer.adds_bos
    ctx = tokenizer.encode(context, add_bos=bos)
    whole = tokenizer.encode(context + continuation, add_bos=bos)
    n = 0
    while n < min(len(ctx), len(whole) - 1) and ctx[n] == whole[n]:
        n += 1
    return whole[:n], whole[n:]


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return tokens


def batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


class StopStrings:
    """``stop_when`` for generation: True once a row's decoded recent ids contain a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]

    def __call__(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids)
        return any(s in text for s in self.stop)


class TokenLM(ABC):
    """``protocol.LanguageModel`` from a batch forward and a greedy id generator."""

    tokenizer: Tokenizer
    batch_size: int
    max_length: int

    @abstractmethod
    def _logprobs_at(self, tokens: Tensor, rows: Tensor, positions: Tensor, labels: Tensor) -> Tensor:
        """``log p(labels[k] | tokens[rows[k], :positions[k] + 1])`` for every k, float32 on the CPU and the
        same on every rank, from one forward of the right-padded batch ``tokens`` (true vocabulary only)."""

    @abstractmethod
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = GREEDY,
        stop: Sequence[str] = (),
    ) -> list[list[int]]:
        """Each prompt's response ids (EOS included when the model stopped)."""

    def token_logprobs(
        self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """log p(token | everything before it) for each continuation token; a context too long for the
        model keeps its end (the continuation itself must fit)."""
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts for {len(continuations)} continuations")
        seqs: list[list[int]] = []  # the distinct sequences to run
        where: dict[tuple[int, ...], int] = {}  # single-token requests share their context's sequence
        plan: list[tuple[int, int, list[int]]] = []  # (sequence, first continuation position, labels)
        for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
            ctx, cont = list(ctx), list(cont)
            if not cont:
                raise ValueError(f"request {i}: empty continuation")
            if len(cont) >= self.max_length:
                raise ValueError(
                    f"request {i}: continuation of {len(cont)} tokens does not fit the model's "
                    f"{self.max_length} positions"
                )
            ctx = ctx[max(0, len(ctx) + len(cont) - self.max_length) :]
            if not ctx:
                raise ValueError(f"request {i}: no context token to condition on")
            key = tuple(ctx) if len(cont) == 1 else None
            if key is not None and key in where:
                plan.append((where[key], len(ctx), cont))
                continue
            seqs.append(ctx if key is not None else ctx + cont)
            if key is not None:
                where[key] = len(seqs) - 1
            plan.append((len(seqs) - 1, len(ctx), cont))
        by_seq: dict[int, list[int]] = {}
        for k, (s, _, _) in enumerate(plan):
            by_seq.setdefault(s, []).append(k)
        out: list[list[float]] = [[] for _ in plan]
        for batch in batches(len(seqs), self.batch_size):
            rows, positions, labels, owners = [], [], [], []
            for j, s in enumerate(batch):
                for k in by_seq[s]:
                    _, start, cont = plan[k]
                    rows += [j] * len(cont)
                    positions += range(start - 1, start - 1 + len(cont))
                    labels += cont
                    owners += [k] * len(cont)
            tokens = right_pad([seqs[s] for s in batch], self.tokenizer.pad_id)
            picked = self._logprobs_at(
                tokens, torch.tensor(rows), torch.tensor(positions), torch.tensor(labels)
            ).tolist()
            for k, value in zip(owners, picked):
                out[k].append(value)
        return out

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        pairs = [split_request(self.tokenizer, c, x) for c, x in requests]
        scores = self.token_logprobs([p[0] for p in pairs], [p[1] for p in pairs])
        return [float(sum(s)) for s in scores]

    def decode_response(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if ids and ids[-1] == self.tokenizer.eos_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids)

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        """Greedy; a row ends at EOS or at a stop string. ``max_new_tokens`` is capped at half the model's
        positions so a prompt always fits."""
        ids = [self.tokenizer.encode(p, add_bos=self.tokenizer.adds_bos) for p in prompts]
        new = max(1, min(max_new_tokens, self.max_length // 2))
        return [
            truncate_at_stop(self.decode_response(r), stop) for r in self.generate_ids(ids, new, stop=stop)
        ]
