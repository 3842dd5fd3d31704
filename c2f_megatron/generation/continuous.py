"""Continuous batching for generation that may stop early (fine mode: EOS allowed, stop strings).

``rollout.generate`` runs a batch until its longest row ends, so a row that stops early holds its slot
idle. Here a row that ends leaves the batch at once and the next prompt takes its cache row: the prompt
is prefilled (packed with the other new prompts of that step) into slots ``0..len-1`` of that row, and decoding goes on with every row at its own
slot (``KVDecoder.forward(slots=...)``). The cost then follows the real response lengths.

Every prompt draws from its own generator (seeded by ``gen_cfg.seed`` and the prompt's index), so a sample
does not depend on which prompts shared the batch with it, nor on ``max_batch``. Greedy rows see the same
tokens as in ``rollout.generate`` up to float rounding (their padding differs). Call on every rank of the
layout's TP/PP group with the same prompts; the tokens are shared from the last stage (and TP rank 0),
and every decision depends on them only, so every rank follows the same schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from c2f_megatron.engine.rows import share_from_last_stage
from c2f_megatron.generation.decode import KVDecoder
from c2f_megatron.generation.rollout import (
    STOP_WINDOW,
    GenerationConfig,
    check_prompts,
    generation_mode,
)
from c2f_megatron.generation.sampling import process_logits, sample_tokens
from c2f_megatron.platform.role_layout import RoleLayout


@torch.no_grad()
def generate_continuous(
    model: torch.nn.Module,
    layout: RoleLayout,
    prompts: list[list[int]],
    gen_cfg: GenerationConfig,
    true_vocab_size: int,
    max_batch: int,
    stop_when: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """Each prompt's response ids (the stop id included when one was sampled; trailing stop and
    suppressed ids are stripped from the prompts first), with at most ``max_batch`` rows decoding at
    once. ``stop_when(ids)`` as in ``rollout.generate``: True ends the row after its latest ids."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    prompts = check_prompts(model, prompts, gen_cfg, true_vocab_size)
    with generation_mode(model):
        return _Scheduler(model, layout, prompts, gen_cfg, true_vocab_size, max_batch, stop_when).run()


class _Scheduler:
    def __init__(self, model, layout, prompts, gen_cfg, vocab, max_batch, stop_when):
        self.layout, self.prompts, self.cfg, self.vocab = layout, prompts, gen_cfg, vocab
        self.stop_when = stop_when
        self.device = next(model.parameters()).device
        rows = min(max_batch, len(prompts))
        slots = max(len(p) for p in prompts) + gen_cfg.max_new_tokens
        self.decoder = KVDecoder(model, layout, rows, slots, cuda_graph=gen_cfg.cuda_graph)
        self.key_ok = torch.zeros((rows, slots), dtype=torch.bool, device=self.device)
        self.stop_ids = set(gen_cfg.stop_ids)
        self.generators = [
            torch.Generator(device=self.device).manual_seed((gen_cfg.seed << 20) + i)
            for i in range(len(prompts))
        ]
        self.responses: list[list[int]] = [[] for _ in prompts]
        self.row_prompt: list[int | None] = [None] * rows  # which prompt each cache row is answering
        self.slot = torch.zeros(rows, dtype=torch.long, device=self.device)  # each row's next token slot
        self.next_prompt = 0

    def _sample(self, logits: Tensor | None, prompt_ids: list[int]) -> list[int]:
        """The next token of each listed prompt from its logits row (last stage), the same on every rank."""
        cfg = self.cfg
        sampled = None
        if logits is not None:
            processed = process_logits(
                logits, self.vocab, cfg.suppress_ids, cfg.temperature, cfg.top_k, cfg.top_p, cfg.greedy
            )
            gens = [self.generators[i] for i in prompt_ids]
            sampled, _ = sample_tokens(processed, cfg.greedy, gens)
            sampled = sampled.double()
        shared = share_from_last_stage(sampled, [len(prompt_ids)], torch.float64, self.layout, over_tp=True)
        return shared.long().tolist()

    def _finished(self, i: int) -> bool:
        response = self.responses[i]
        if response[-1] in self.stop_ids or len(response) >= self.cfg.max_new_tokens:
            return True
        return self.stop_when is not None and self.stop_when(response[-STOP_WINDOW:])

    def _fill(self, rows: list[int]) -> None:
        """Put the next prompts in cache rows ``rows``, each at slots ``0..len-1``, in one packed prefill,
        and sample their first tokens; rows with no prompt left stay idle."""
        rows = rows[: len(self.prompts) - self.next_prompt]
        if not rows:
            return
        take = list(range(self.next_prompt, self.next_prompt + len(rows)))
        self.next_prompt += len(rows)
        for r, i in zip(rows, take):
            self.key_ok[r] = False
            self.key_ok[r, : len(self.prompts[i])] = True
            self.row_prompt[r] = i
        logits = self.decoder.prefill([self.prompts[i] for i in take], rows, [0] * len(rows))
        for r, i, t in zip(rows, take, self._sample(logits, take)):
            self.responses[i].append(t)
            self.slot[r] = len(self.prompts[i])

    def run(self) -> list[list[int]]:
        rows = self.key_ok.shape[0]
        self._fill(list(range(rows)))
        while True:
            ended = [r for r, i in enumerate(self.row_prompt) if i is not None and self._finished(i)]
            for r in ended:
                self.row_prompt[r] = None
            self._fill(ended)  # the next prompts take the freed rows
            active = [r for r, i in enumerate(self.row_prompt) if i is not None]
            if not active:
                return self.responses
            last = torch.full((rows,), self.cfg.pad_id, dtype=torch.long, device=self.device)
            for r in active:
                last[r] = self.responses[self.row_prompt[r]][-1]
                self.key_ok[r, self.slot[r]] = True
            # idle rows decode a pad at their last slot: their outputs are never read
            logits = self.decoder.decode(last, self.slot, self.key_ok)
            if logits is not None:
                logits = logits[active]
            prompt_ids = [self.row_prompt[r] for r in active]
            for r, i, t in zip(active, prompt_ids, self._sample(logits, prompt_ids)):
                self.responses[i].append(t)
                self.slot[r] += 1
