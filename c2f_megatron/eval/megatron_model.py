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

import torch
from torch import Tensor

from c2f_megatron.checkpoint import METADATA_FILE
from c2f_megatron.checkpoint.megatron_dir import CheckpointError, read_metadata
from c2f_megatron.checkpoint.resolve import check_tokenizer
from c2f_megatron.data.tokenizer import Tokenizer
from c2f_megatron.engine.role_model import RoleModel
from c2f_megatron.engine.rows import share_from_last_stage
from c2f_megatron.eval.lm import GREEDY, Sampling, StopStrings, TokenLM, batches, right_pad


def load_role(ckpt: Path, kind: str, layer_spec: str, tokenizer: Tokenizer) -> RoleModel:
    """A frozen ``kind`` model of ``ckpt`` on megatron's global layout (whatever TP/PP it was saved at),
    refused when the checkpoint is another kind or recorded another tokenizer. ``layer_spec`` is a
    run-time choice; the rollout needs ``sdpa`` or ``local`` (TE ignores padding masks)."""
    meta = read_metadata(ckpt)
    if meta.kind != kind:
        raise CheckpointError(
            f"{ckpt / METADATA_FILE}: field 'kind' is {meta.kind!r}, expected {kind!r} "
            f"({'a language model' if kind == 'gpt' else 'a reward model'})"
        )
    check_tokenizer(tokenizer.info().to_dict(), meta, ckpt / METADATA_FILE)
    return RoleModel.from_checkpoint(kind, kind, ckpt, runtime={"layer_spec": layer_spec})


class MegatronLM(TokenLM):
    """``protocol.LanguageModel`` over a Megatron GPT model (plus id-level calls the HH metrics need)."""

    def __init__(self, role: RoleModel, tokenizer: Tokenizer, batch_size: int = 8, seed: int = 0):
        self.role = role
        self.chunk = role.module
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.max_length = role.model_cfg.max_position_embeddings

    @classmethod
    def from_checkpoint(
        cls, ckpt: Path, tokenizer: Tokenizer, batch_size: int = 8, seed: int = 0, layer_spec: str = "sdpa"
    ) -> MegatronLM:
        return cls(load_role(ckpt, "gpt", layer_spec, tokenizer), tokenizer, batch_size, seed)

    def _logprobs_at(self, tokens: Tensor, rows: Tensor, positions: Tensor, labels: Tensor) -> Tensor:
        from c2f_megatron.checkpoint.verify import megatron_logits

        logits = megatron_logits(self.chunk, tokens, self.tokenizer.vocab_size)
        picked = None
        if logits is not None:  # the last pipeline stage: log-softmax only where a label is read
            at = logits[rows.to(logits.device), positions.to(logits.device)].float()
            picked = torch.log_softmax(at, -1).gather(-1, labels.to(logits.device)[:, None]).squeeze(-1)
        return share_from_last_stage(picked, [len(labels)], torch.float32, self.role.layout).cpu()

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = GREEDY,
        stop: Sequence[str] = (),
    ) -> list[list[int]]:
        """Each prompt's response ids, EOS included when the model stopped (a row that produced a stop
        string ends there too); prompts keep their last ``max_length - max_new_tokens`` tokens. Up to
        ``batch_size`` prompts decode at once, continuously batched (a finished row's slot takes the next
        prompt); prompt ``i`` samples from its own generator seeded by ``seed`` and ``i``."""
        from c2f_megatron.generation.continuous import generate_continuous
        from c2f_megatron.generation.rollout import fine_generation_config

        if max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in {self.max_length} positions")
        if not prompts:
            return []
        keep = self.max_length - max_new_tokens
        gen_cfg = fine_generation_config(
            self.tokenizer.eos_id,
            self.tokenizer.pad_id,
            max_new_tokens,
            **dataclasses.asdict(sampling),
            seed=self.seed,
        )
        return generate_continuous(
            self.chunk,
            self.role.layout,
            [list(p)[-keep:] for p in prompts],
            gen_cfg,
            self.tokenizer.vocab_size,
            max_batch=self.batch_size,
            stop_when=StopStrings(self.tokenizer, stop) if stop else None,
        )


class RewardScorer:
    """A frozen reward model (``kind: value`` checkpoint) read at each sequence's last token."""

    def __init__(self, role: RoleModel, pad_id: int, batch_size: int = 8):
        self.role = role
        self.chunk = role.module
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.max_length = role.model_cfg.max_position_embeddings

    @classmethod
    def from_checkpoint(
        cls, ckpt: Path, tokenizer: Tokenizer, batch_size: int = 8, layer_spec: str = "sdpa"
    ) -> RewardScorer:
        return cls(load_role(ckpt, "value", layer_spec, tokenizer), tokenizer.pad_id, batch_size)

    def score(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """One score per ``[BOS] prompt response`` id sequence; too-long sequences keep their end."""
        from c2f_megatron.checkpoint.verify import megatron_logits

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
            out += share_from_last_stage(last, [len(seqs)], torch.float32, self.role.layout).cpu().tolist()
        return out
