"""Evaluation backends over c2f Megatron checkpoints: a ``LanguageModel`` and a reward-model scorer.

Both load a checkpoint at whatever TP/PP the process was launched with (distributed checkpoints reshard on
load) and must be called on every rank of the model-parallel group with the same inputs; results are
identical on every rank, so rank 0 can write them whatever its pipeline stage.

- Scoring (log-likelihoods, perplexity) is ``eval.lm.TokenLM``'s: one full forward over right-padded
  ``[BOS] context continuation`` batches, only the true vocabulary in the softmax (the TP padding rows of
  the logits are dropped), computed on the last pipeline stage and shared.
- Generation is ``rl.rollout.generate`` in fine mode (EOS ends a response, and a stop string ends a row),
  i.e. the same KV-cached sampler the PPO actor uses, so evaluation sees exactly the decoding the policy
  was trained with.
- The reward model is read at each sequence's last token, as in reward-model training and PPO.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from c2f_megatron.checkpoint.megatron_dir import METADATA_FILE, CheckpointError, CheckpointMetadata
from c2f_megatron.data.tokenizer import Tokenizer
from c2f_megatron.eval.lm import StopStrings, TokenLM, batches, right_pad


def resolve_checkpoint(path: str | Path, role: str = "actor") -> Path:
    """A complete c2f checkpoint from ``path``: itself, the latest ``step_*`` of a training root, and inside a
    PPO step directory its ``role`` model (``actor`` by default)."""
    from c2f_megatron.training.checkpointing import latest_checkpoint

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: checkpoint directory not found")
    if not (p / METADATA_FILE).is_file():
        if (p / role / METADATA_FILE).is_file():
            return p / role
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(
                f"{p}: neither a c2f checkpoint ({METADATA_FILE}) nor a root holding complete step_* checkpoints"
            )
        p = latest / role if (latest / role / METADATA_FILE).is_file() else latest
    if not (p / METADATA_FILE).is_file():
        raise CheckpointError(f"{p}: {METADATA_FILE} missing; not a complete c2f checkpoint")
    return p


def load_chunk(ckpt: Path, kind: str, layer_spec: str = "sdpa") -> tuple[torch.nn.Module, CheckpointMetadata]:
    """Build this rank's single model chunk for ``ckpt`` (``kind`` "gpt" or "value") and load its weights.

    ``layer_spec`` is a run-time choice; the rollout needs ``sdpa`` or ``local`` (TE ignores padding masks).
    """
    from c2f_megatron.checkpoint.megatron_dir import load_model_checkpoint, read_metadata

    meta = read_metadata(ckpt)
    if meta.kind != kind:
        raise CheckpointError(
            f"{ckpt / METADATA_FILE}: field 'kind' is {meta.kind!r}, expected {kind!r} "
            f"({'a language model' if kind == 'gpt' else 'a reward model'})"
        )
    model_cfg = dataclasses.replace(meta.model, layer_spec=layer_spec)
    if kind == "gpt":
        from c2f_megatron.models.gpt import build_gpt_model

        chunk = build_gpt_model(model_cfg, perform_initialization=False)
    else:
        from c2f_megatron.models.value_head import build_value_model

        chunk = build_value_model(model_cfg, perform_initialization=False)
    load_model_checkpoint([chunk], ckpt)
    chunk.requires_grad_(False)
    chunk.eval()
    return chunk, meta


def check_tokenizer(tokenizer: Tokenizer, meta: CheckpointMetadata, ckpt: Path) -> None:
    """Refuse a tokenizer whose vocabulary differs from the one the checkpoint recorded."""
    recorded: dict[str, Any] = meta.tokenizer or {}
    ours = tokenizer.info().to_dict()
    for key in ("fingerprint", "vocab_size", "eos_id"):
        if recorded.get(key) is not None and recorded[key] != ours[key]:
            raise CheckpointError(
                f"{ckpt / METADATA_FILE}: field tokenizer.{key} is {recorded[key]!r} but the configured "
                f"tokenizer {tokenizer.name!r} has {ours[key]!r}; set the tokenizer the model was trained with"
            )
    if tokenizer.vocab_size > meta.model.vocab_size:
        raise CheckpointError(
            f"{ckpt / METADATA_FILE}: model.vocab_size {meta.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ids"
        )


def _share_from_last_stage(values: Tensor | None, shape: list[int]) -> Tensor:
    """A float32 tensor computed on the last pipeline stage, on every stage."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        from megatron.core.inference.communication_utils import broadcast_from_last_pipeline_stage

        values = broadcast_from_last_pipeline_stage(shape, torch.float32, values)
    assert values is not None
    return values


class MegatronLM(TokenLM):
    """``protocol.LanguageModel`` over one Megatron GPT chunk (plus id-level calls the HH metrics need)."""

    def __init__(self, chunk: torch.nn.Module, tokenizer: Tokenizer, batch_size: int = 8, seed: int = 0):
        from megatron.core.utils import get_attr_wrapped_model

        self.chunk = chunk
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.max_length = int(get_attr_wrapped_model(chunk, "max_sequence_length"))

    @classmethod
    def from_checkpoint(
        cls, ckpt: Path, tokenizer: Tokenizer, batch_size: int = 8, seed: int = 0, layer_spec: str = "sdpa"
    ) -> MegatronLM:
        chunk, meta = load_chunk(ckpt, "gpt", layer_spec)
        check_tokenizer(tokenizer, meta, ckpt)
        return cls(chunk, tokenizer, batch_size, seed)

    def _logprobs_at(self, tokens: Tensor, rows: Tensor, positions: Tensor, labels: Tensor) -> Tensor:
        from c2f_megatron.checkpoint.convert import megatron_logits

        logits = megatron_logits(self.chunk, tokens, self.tokenizer.vocab_size)
        picked = None
        if logits is not None:  # the last pipeline stage: log-softmax only where a label is read
            at = logits[rows.to(logits.device), positions.to(logits.device)].float()
            picked = torch.log_softmax(at, -1).gather(-1, labels.to(logits.device)[:, None]).squeeze(-1)
        return _share_from_last_stage(picked, [len(labels)]).cpu()

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        greedy: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
    ) -> list[list[int]]:
        """Each prompt's response ids, EOS included when the model stopped (a row that produced a stop
        string ends there too); prompts keep their last ``max_length - max_new_tokens`` tokens. Batch
        ``k`` samples with seed ``seed + k``."""
        from c2f_megatron.rl.rollout import fine_generation_config, generate

        if max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in {self.max_length} positions")
        keep = self.max_length - max_new_tokens
        stop_when = StopStrings(self.tokenizer, stop) if stop else None
        out: list[list[int]] = []
        for k, rows in enumerate(batches(len(prompts), self.batch_size)):
            gen_cfg = fine_generation_config(
                self.tokenizer.eos_id,
                self.tokenizer.pad_id,
                max_new_tokens,
                greedy=greedy,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=self.seed + k,
            )
            batch = [list(prompts[i])[-keep:] for i in rows]
            result = generate(self.chunk, batch, gen_cfg, self.tokenizer.vocab_size, stop_when=stop_when)
            out += result.response_ids()
        return out


class RewardScorer:
    """A frozen reward model (``kind: value`` checkpoint) read at each sequence's last token."""

    def __init__(self, chunk: torch.nn.Module, pad_id: int, batch_size: int = 8):
        from megatron.core.utils import get_attr_wrapped_model

        self.chunk = chunk
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.max_length = int(get_attr_wrapped_model(chunk, "max_sequence_length"))

    @classmethod
    def from_checkpoint(
        cls, ckpt: Path, tokenizer: Tokenizer, batch_size: int = 8, layer_spec: str = "sdpa"
    ) -> RewardScorer:
        chunk, meta = load_chunk(ckpt, "value", layer_spec)
        check_tokenizer(tokenizer, meta, ckpt)
        return cls(chunk, tokenizer.pad_id, batch_size)

    def score(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """One score per ``[BOS] prompt response`` id sequence; too-long sequences keep their end."""
        from c2f_megatron.checkpoint.convert import megatron_logits

        out: list[float] = []
        for rows in batches(len(sequences), self.batch_size):
            seqs = [list(sequences[i])[-self.max_length :] for i in rows]
            if any(not s for s in seqs):
                raise ValueError("an empty sequence has no reward")
            tokens = right_pad(seqs, self.pad_id)
            values = megatron_logits(self.chunk, tokens, 1)  # [b, s, 1] on the last stage
            last = None
            if values is not None:
                index = torch.tensor([len(s) - 1 for s in seqs], device=values.device)
                last = values[:, :, 0].gather(1, index[:, None]).squeeze(1).float().contiguous()
            out += _share_from_last_stage(last, [len(seqs)]).cpu().tolist()
        return out
