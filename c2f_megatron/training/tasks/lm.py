"""``c2f train-lm``: next-token loss on plain text, packed into fixed-length sequences.

Also home of the token-level loss that SFT reuses: cross entropy over the TP-sharded vocabulary with the
padded vocabulary columns masked out, summed over the loss mask (the loop's per-token convention).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from c2f_megatron.training.config import TrainerSections


@dataclass
class TextDataConfig:
    """Plain-text sources: ``.txt`` (one document per file) or ``.jsonl[.gz]`` with a ``text`` field."""

    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    eval_fraction: float = 0.02  # of the packed sequences, taken from the end
    tokenizer: str | None = None  # load_tokenizer spec; None = Mistral v0.1 sentencepiece


@dataclass
class LMJobConfig(TrainerSections):
    data: TextDataConfig = field(default_factory=TextDataConfig)


def read_documents(paths: list[str], text_field: str = "text") -> list[str]:
    """Documents from text/JSONL files; errors name the file and line."""
    if not paths:
        raise ValueError("data.paths is empty: give at least one .txt or .jsonl file")
    docs = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.paths: {path} not found")
        if path.suffix in (".txt", ".md"):
            docs.append(path.read_text(encoding="utf-8"))
            continue
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: field {text_field!r} missing or not a string")
                docs.append(text)
    return docs


def pack_documents(token_docs: list[list[int]], seq_length: int) -> list[list[int]]:
    """Concatenate documents and cut into windows of ``seq_length + 1`` ids (inputs plus shifted labels)."""
    stream = [t for doc in token_docs for t in doc]
    width = seq_length + 1
    return [stream[i : i + width] for i in range(0, len(stream) - width + 1, seq_length)]


def token_loss(labels: Tensor, loss_mask: Tensor, true_vocab_size: int, logits: Tensor):
    """``loss_func`` for token prediction: (sum of masked CE, number of masked tokens, metrics).

    ``logits`` are this TP rank's vocabulary slice ``[b, s, V/tp]``; the padded vocabulary columns are set
    to -inf so they take no probability mass.
    """
    from megatron.core import parallel_state, tensor_parallel

    from c2f_megatron.models.gpt import mask_padded_vocab

    start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    logits = mask_padded_vocab(logits.float(), true_vocab_size, start)
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
    mask = loss_mask.to(losses.dtype)
    loss_sum = (losses * mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), mask.sum()])}


def token_forward_step(true_vocab_size: int, data_iterator: Any, model: torch.nn.Module):
    """megatron ``forward_step_func`` for batches with ``tokens``, ``labels``, ``loss_mask`` ([b, s])."""
    from c2f_megatron.models.gpt import position_ids_for

    batch = next(data_iterator)
    tokens = batch["tokens"]
    output = model(tokens, position_ids_for(tokens), None)
    return output, partial(token_loss, batch["labels"], batch["loss_mask"], true_vocab_size)


def collate_windows(windows: list[list[int]], device: torch.device) -> dict[str, Tensor]:
    ids = torch.tensor(windows, dtype=torch.long)
    return {
        "tokens": ids[:, :-1].to(device),
        "labels": ids[:, 1:].to(device),
        "loss_mask": torch.ones_like(ids[:, 1:], dtype=torch.float32).to(device),
    }


def build_task(cfg: LMJobConfig, true_vocab_size: int | None = None):
    """The LM task: documents tokenised with BOS/EOS, packed to ``train.seq_length``."""
    from c2f_megatron.data import load_tokenizer
    from c2f_megatron.platform.distributed import device
    from c2f_megatron.training.trainer import Task

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    docs = read_documents(cfg.data.paths, cfg.data.text_field)
    token_docs = [tokenizer.encode(d, add_bos=tokenizer.adds_bos, add_eos=True) for d in docs]
    windows = pack_documents(token_docs, cfg.train.seq_length)
    if not windows:
        raise ValueError(f"data.paths: fewer than seq_length+1={cfg.train.seq_length + 1} tokens in total")
    n_eval = int(len(windows) * cfg.data.eval_fraction)
    train, evals = windows[: len(windows) - n_eval], windows[len(windows) - n_eval :]
    vocab = true_vocab_size or tokenizer.vocab_size
    return Task(
        name="train-lm",
        kind="gpt",
        train=train,
        eval=evals,
        collate=partial(collate_windows, device=device()),
        forward_step=partial(token_forward_step, vocab),
        tokenizer=tokenizer.info().to_dict(),
    )
