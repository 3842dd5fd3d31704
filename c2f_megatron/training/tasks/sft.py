"""``c2f train-sft``: supervised fine-tuning on (prompt, response) pairs, loss on the response only.

Each example is ``[BOS] prompt response [EOS]`` (the response ends with EOS so the model learns to stop);
the loss covers the response tokens and the EOS, never the prompt. Examples longer than ``seq_length + 1``
keep the end of the prompt (the turns nearest the response) and, if still too long, cut the response's
tail, which then has no EOS. HH-RLHF pairs give the prompts and their ``chosen`` responses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from c2f_megatron.data.chat import ChatFormat
from c2f_megatron.data.hh_rlhf import HHDataConfig
from c2f_megatron.training.config import TrainerSections


@dataclass
class SFTDataConfig:
    hh: HHDataConfig = field(default_factory=HHDataConfig)
    tokenizer: str | None = None  # load_tokenizer spec; None = Mistral v0.1 sentencepiece


@dataclass
class SFTJobConfig(TrainerSections):
    data: SFTDataConfig = field(default_factory=SFTDataConfig)


@dataclass(frozen=True)
class SFTExample:
    """``ids`` (at most seq_length + 1) and how many leading ids are prompt (BOS included)."""

    ids: tuple[int, ...]
    prompt_len: int


def build_example(
    prompt_ids: list[int], response_ids: list[int], bos_id: int | None, eos_id: int, seq_length: int
) -> SFTExample:
    """Truncate to ``seq_length + 1`` ids keeping the end of the prompt; the response gets at most the
    part of the budget that leaves half for the prompt (or the whole prompt if it is shorter)."""
    budget = seq_length + 1
    bos = [bos_id] if bos_id is not None else []
    room = budget - len(bos)
    response = [*response_ids, eos_id]
    response = response[: room - min(len(prompt_ids), room // 2)]
    keep = room - len(response)
    prompt = prompt_ids[len(prompt_ids) - keep :] if keep < len(prompt_ids) else prompt_ids
    if not response:
        raise ValueError("seq_length too small: no room for the response")
    ids = (*bos, *prompt, *response)
    return SFTExample(ids, len(bos) + len(prompt))


def collate_sft(
    examples: list[SFTExample], seq_length: int, pad_id: int, device: torch.device
) -> dict[str, Tensor]:
    """Right-padded ``tokens``/``labels`` [b, seq_length]; ``loss_mask`` is 1 where the label is a response
    token or the EOS."""
    b = len(examples)
    ids = torch.full((b, seq_length + 1), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(b, seq_length, dtype=torch.float32)
    for row, ex in enumerate(examples):
        ids[row, : len(ex.ids)] = torch.tensor(ex.ids, dtype=torch.long)
        # label position t predicts ids[t + 1]: response ids sit at prompt_len .. len(ids)-1
        loss_mask[row, max(ex.prompt_len - 1, 0) : len(ex.ids) - 1] = 1.0
    return {
        "tokens": ids[:, :-1].to(device),
        "labels": ids[:, 1:].to(device),
        "loss_mask": loss_mask.to(device),
    }


def tokenize_pairs(pairs, chat: ChatFormat, seq_length: int) -> list[SFTExample]:
    """Each pair's prompt (in ``chat``'s format) with its chosen response."""
    out = []
    for pair in pairs:
        prompt_ids, response_ids = chat.encode_pair(chat.from_hh(pair.prompt), pair.chosen)
        out.append(build_example(prompt_ids, response_ids, chat.bos_id, chat.tokenizer.eos_id, seq_length))
    return out


def build_task(cfg: SFTJobConfig):
    from c2f_megatron.data import SKIPPED_RECORDS_FILE, load_from_config, load_tokenizer
    from c2f_megatron.platform.distributed import device
    from c2f_megatron.training.tasks.lm import token_forward_step
    from c2f_megatron.training.trainer import Task

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    chat = ChatFormat(cfg.data.hh.prompt_format, tokenizer)
    data = load_from_config(cfg.data.hh, Path(cfg.logging.run_dir) / SKIPPED_RECORDS_FILE)
    seq = cfg.train.seq_length
    train = tokenize_pairs(data.train, chat, seq)
    evals = tokenize_pairs(data.eval, chat, seq)
    return Task(
        name="train-sft",
        kind="gpt",
        train=train,
        eval=evals,
        collate=partial(collate_sft, seq_length=seq, pad_id=tokenizer.pad_id, device=device()),
        forward_step=partial(token_forward_step, tokenizer.vocab_size),
        tokenizer=tokenizer.info().to_dict(),
        skipped_records=data.skipped_log,
    )
