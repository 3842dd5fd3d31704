"""The PPO prompt stream: HH-RLHF prompts in the model's format (or synthetic ids), and which of them each
data-parallel rank rolls out at each iteration.

Everything an iteration draws is a function of ``(ppo.seed, iteration)``: the prompts of iteration ``it``
are positions ``[it * B, (it + 1) * B)`` of seeded epoch permutations (``training.data_order``), split
over the actor's data-parallel ranks in order, whatever the split.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from c2f_megatron.files import DataFileError
from c2f_megatron.rl.config import PPOJobConfig


@dataclass
class PromptSource:
    """Tokenised prompts plus the ids the rollout needs (EOS/pad) and tokenizer info for checkpoints."""

    prompts: list[list[int]]
    eos_id: int
    pad_id: int
    vocab_size: int
    tokenizer: dict[str, Any] | None = None
    decode: Callable[[list[int]], str] = field(default=lambda ids: " ".join(map(str, ids)))
    skipped_records: Path | None = None  # the list of malformed HH records, when there were any


def load_prompts(cfg: PPOJobConfig, model_vocab: int) -> PromptSource:
    data = cfg.data
    if data.source == "synthetic":
        syn = data.synthetic  # lengths and counts are checked at load (SyntheticPrompts)
        if syn.low >= model_vocab:
            raise ValueError(f"data.synthetic.low {syn.low} must be below the model's vocab {model_vocab}")
        rng = random.Random(cfg.ppo.seed)
        prompts = [
            [rng.randrange(syn.low, model_vocab) for _ in range(rng.randint(syn.min_len, syn.max_len))]
            for _ in range(syn.num_prompts)
        ]
        return PromptSource(prompts, eos_id=2, pad_id=0, vocab_size=model_vocab)
    from c2f_megatron.data import (
        SKIPPED_RECORDS_FILE,
        ChatFormat,
        encode_prompts,
        load_from_config,
        load_tokenizer,
        prompts_for_rl,
    )

    tokenizer = load_tokenizer(data.tokenizer)
    chat = ChatFormat(data.hh.prompt_format, tokenizer)
    hh = load_from_config(data.hh, log=False)  # logged (and the skipped records listed) once usable
    texts = prompts_for_rl(hh.train, chat, data.system_prompt)
    stops = [tokenizer.eos_id, tokenizer.pad_id, *cfg.generation.extra_stop_ids]
    prompts = [ids for _, ids in encode_prompts(chat, texts, stops, data.max_prompt_length, data.overlong)]
    if not prompts:
        sources = ", ".join(hh.load.sources)
        if data.overlong == "drop":
            raise DataFileError(
                f"{sources}: all {len(texts)} prompt(s) are longer than data.max_prompt_length "
                f"{data.max_prompt_length} tokens and data.overlong is drop"
            )
        raise DataFileError(
            f"{sources}: none of the {len(texts)} prompt(s) has a token left after its stop ids"
        )
    skipped = hh.load.log(Path(cfg.logging.run_dir) / SKIPPED_RECORDS_FILE)
    return PromptSource(
        prompts,
        tokenizer.eos_id,
        tokenizer.pad_id,
        tokenizer.vocab_size,
        tokenizer.info().to_dict(),
        tokenizer.decode,
        skipped,
    )


def iteration_prompts(
    source: PromptSource, iteration: int, batch: int, seed: int, dp_rank: int, dp_size: int
) -> tuple[list[list[int]], int]:
    """This DP rank's prompts of ``iteration`` (positions ``[it*B, (it+1)*B)`` of seeded epoch
    permutations) and the index of its first prompt within the iteration's batch."""
    from c2f_megatron.training.data_order import DataOrder

    order = DataOrder(len(source.prompts), seed)
    per_rank = batch // dp_size
    offset = dp_rank * per_rank
    return [source.prompts[i] for i in order.indices(iteration * batch + offset, per_rank)], offset
