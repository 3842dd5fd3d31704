"""``c2f train-rm``: a reward model on preference pairs (GPT backbone + scalar head).

Each sequence is ``[BOS] prompt response [EOS]`` and its score is the head's output at the last real
token (the EOS, unless truncated). A micro-batch holds ``m`` pairs as ``2m`` rows, chosen first, so both
sides of a pair see the same weights and land in the same loss term. Losses, per pair:

- ``logsigmoid`` (default, Bradley-Terry): ``-log sigmoid(r_chosen - r_rejected)``;
- ``margin`` (ICE-GRT): ``max(0, m - r_chosen + r_rejected)``.

Eval reports accuracy (``r_chosen > r_rejected``), the mean reward gap, and the reward mean/std over both
sides (PPO normalises rewards with them; they are also stored in the checkpoint's metadata at the end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from c2f_megatron.data.chat import ChatFormat
from c2f_megatron.data.hh_rlhf import HHDataConfig
from c2f_megatron.training.config import TrainerSections


@dataclass
class RewardConfig:
    loss: Literal["logsigmoid", "margin"] = "logsigmoid"
    margin: float = 1.0  # m of the margin ranking loss


@dataclass
class RMDataConfig:
    hh: HHDataConfig = field(default_factory=HHDataConfig)
    tokenizer: str | None = None  # load_tokenizer spec; None = Mistral v0.1 sentencepiece


@dataclass
class RMJobConfig(TrainerSections):
    data: RMDataConfig = field(default_factory=RMDataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass(frozen=True)
class PairExample:
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


def pair_loss(r_chosen: Tensor, r_rejected: Tensor, kind: str = "logsigmoid", margin: float = 1.0) -> Tensor:
    """Per-pair loss ``[m]`` (see the module docstring)."""
    diff = r_chosen - r_rejected
    if kind == "logsigmoid":
        return -F.logsigmoid(diff)
    if kind == "margin":
        return torch.clamp(margin - diff, min=0.0)
    raise ValueError(f"reward.loss must be 'logsigmoid' or 'margin', got {kind!r}")


def reward_loss(last_index: Tensor, kind: str, margin: float, values: Tensor):
    """``loss_func``: scores at each row's last real token, rows ``[:m]`` chosen and ``[m:]`` rejected."""
    from c2f_megatron.models.value_head import gather_last

    rewards = gather_last(values.float(), last_index)
    m = rewards.shape[0] // 2
    r_c, r_r = rewards[:m], rewards[m:]
    losses = pair_loss(r_c, r_r, kind, margin)
    loss_sum = losses.sum()
    d = rewards.detach()
    pairs = torch.tensor(float(m), device=d.device)
    rows = torch.tensor(float(2 * m), device=d.device)
    metrics = {
        "loss": torch.stack([loss_sum.detach(), pairs]),
        "accuracy": torch.stack([(d[:m] > d[m:]).float().sum(), pairs]),
        "reward_gap": torch.stack([(d[:m] - d[m:]).sum(), pairs]),
        "reward_mean": torch.stack([d.sum(), rows]),
        "reward_sq": torch.stack([(d * d).sum(), rows]),
    }
    return loss_sum, torch.tensor(m, dtype=torch.int, device=d.device), metrics


def reward_forward_step(kind: str, margin: float, data_iterator: Any, model: torch.nn.Module):
    from c2f_megatron.models.gpt import position_ids_for

    batch = next(data_iterator)
    tokens = batch["tokens"]
    values = model(tokens, position_ids_for(tokens), None)
    return values, partial(reward_loss, batch["last_index"], kind, margin)


def finalize_reward_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Turn the pooled ``reward_sq`` into ``reward_std``."""
    out = dict(metrics)
    if "reward_sq" in out and "reward_mean" in out:
        var = out.pop("reward_sq") - out["reward_mean"] ** 2
        out["reward_std"] = math.sqrt(max(var, 0.0))
    return out


def collate_pairs(
    pairs: list[PairExample], seq_length: int, pad_id: int, device: torch.device
) -> dict[str, Tensor]:
    """``tokens`` [2m, seq_length] right-padded (chosen rows first) and ``last_index`` [2m]."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    tokens = torch.full((len(rows), seq_length), pad_id, dtype=torch.long)
    last = torch.empty(len(rows), dtype=torch.long)
    for i, ids in enumerate(rows):
        if not 0 < len(ids) <= seq_length:
            raise ValueError(f"sequence of {len(ids)} ids does not fit seq_length {seq_length}")
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        last[i] = len(ids) - 1
    return {"tokens": tokens.to(device), "last_index": last.to(device)}


def tokenize_pairs(pairs, chat: ChatFormat, seq_length: int) -> list[PairExample]:
    """Both sides as ``[BOS] prompt response [EOS]`` in ``chat``'s format, at most ``seq_length`` ids,
    prompt cut from the left."""
    from c2f_megatron.training.tasks.sft import build_example

    out = []
    for pair in pairs:
        prompt = chat.from_hh(pair.prompt)
        sides = []
        for response in (pair.chosen, pair.rejected):
            prompt_ids, response_ids = chat.encode_pair(prompt, response)
            ex = build_example(prompt_ids, response_ids, chat.bos_id, chat.tokenizer.eos_id, seq_length - 1)
            sides.append(ex.ids)
        out.append(PairExample(sides[0], sides[1]))
    return out


def make_task(
    name: str,
    train: list[PairExample],
    evals: list[PairExample],
    seq_length: int,
    pad_id: int,
    reward: RewardConfig,
    tokenizer_info: dict[str, Any] | None = None,
):
    """A reward-model ``Task`` over already tokenised pairs (synthetic data in tests uses this directly)."""
    from c2f_megatron.platform.distributed import device
    from c2f_megatron.training.trainer import Task

    return Task(
        name=name,
        kind="value",
        train=train,
        eval=evals,
        collate=partial(collate_pairs, seq_length=seq_length, pad_id=pad_id, device=device()),
        forward_step=partial(reward_forward_step, reward.loss, reward.margin),
        sequences_per_sample=2,
        tokenizer=tokenizer_info,
        finalize_metrics=finalize_reward_metrics,
        extra_metadata={"reward_loss": reward.loss, "reward_margin": reward.margin},
    )


def build_task(cfg: RMJobConfig):
    from c2f_megatron.data import SKIPPED_RECORDS_FILE, load_from_config, load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    chat = ChatFormat(cfg.data.hh.prompt_format, tokenizer)
    data = load_from_config(cfg.data.hh, Path(cfg.logging.run_dir) / SKIPPED_RECORDS_FILE)
    seq = cfg.train.seq_length
    task = make_task(
        "train-rm",
        tokenize_pairs(data.train, chat, seq),
        tokenize_pairs(data.eval, chat, seq),
        seq,
        tokenizer.pad_id,
        cfg.reward,
        tokenizer.info().to_dict(),
    )
    task.skipped_records = data.skipped_log
    return task
