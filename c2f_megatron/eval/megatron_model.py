"""Evaluation backends over c2f Megatron checkpoints: a ``LanguageModel`` and a reward-model scorer.

Both load a checkpoint at whatever TP/PP the process was launched with (distributed checkpoints reshard on
load) and must be called on every rank of the model-parallel group with the same inputs; results are
identical on every rank, so rank 0 can write them whatever its pipeline stage.

- Scoring (log-likelihoods, perplexity) is one full forward over right-padded ``[BOS] context continuation``
  batches: causal attention makes trailing padding invisible to the real tokens, and only the true
  vocabulary enters the softmax (the TP padding rows of the logits are dropped).
- Generation is ``rl.rollout.generate`` in fine mode (EOS ends a response), i.e. the same KV-cached sampler
  the PPO actor uses, so evaluation sees exactly the decoding the policy was trained with.
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
from c2f_megatron.eval.protocol import truncate_at_stop


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


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return tokens


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


class MegatronLM:
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

    # ------------------------------------------------------------------------------------------ scoring

    def token_logprobs(
        self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """log p(token | everything before it) for each continuation token; a context too long for the
        model keeps its end (the continuation itself must fit)."""
        from c2f_megatron.checkpoint.convert import megatron_logits

        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts for {len(continuations)} continuations")
        out: list[list[float]] = []
        vocab = self.tokenizer.vocab_size
        for rows in _batches(len(contexts), self.batch_size):
            seqs, starts, lens = [], [], []
            for i in rows:
                ctx, cont = list(contexts[i]), list(continuations[i])
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
                seqs.append(ctx + cont)
                starts.append(len(ctx))
                lens.append(len(cont))
            tokens = _right_pad(seqs, self.tokenizer.pad_id)
            width = max(lens)
            logits = megatron_logits(self.chunk, tokens, vocab)
            picked = None
            if logits is not None:
                logp = torch.log_softmax(logits.float(), dim=-1)
                picked = torch.zeros((len(seqs), width), dtype=torch.float32, device=logp.device)
                for j, (s, n) in enumerate(zip(starts, lens)):
                    labels = tokens[j, s : s + n].to(logp.device)
                    picked[j, :n] = logp[j, s - 1 : s + n - 1].gather(-1, labels[:, None]).squeeze(-1)
            picked = _share_from_last_stage(picked, [len(seqs), width]).cpu()
            out += [picked[j, :n].tolist() for j, n in enumerate(lens)]
        return out

    def _split_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Ids of ``[BOS] context`` and of the continuation as it tokenizes inside the whole text (tokens
        after the longest common prefix with the context's own ids are the continuation's)."""
        bos = self.tokenizer.bos_id is not None
        ctx = self.tokenizer.encode(context, add_bos=bos)
        whole = self.tokenizer.encode(context + continuation, add_bos=bos)
        n = 0
        while n < min(len(ctx), len(whole) - 1) and ctx[n] == whole[n]:
            n += 1
        return whole[:n], whole[n:]

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        pairs = [self._split_request(c, x) for c, x in requests]
        scores = self.token_logprobs([p[0] for p in pairs], [p[1] for p in pairs])
        return [float(sum(s)) for s in scores]

    # ---------------------------------------------------------------------------------------- generation

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        greedy: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> list[list[int]]:
        """Each prompt's response ids, EOS included when the model stopped; prompts keep their last
        ``max_length - max_new_tokens`` tokens. Batch ``k`` samples with seed ``seed + k``."""
        from c2f_megatron.rl.rollout import fine_generation_config, generate

        if max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in {self.max_length} positions")
        keep = self.max_length - max_new_tokens
        out: list[list[int]] = []
        for k, rows in enumerate(_batches(len(prompts), self.batch_size)):
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
            result = generate(self.chunk, batch, gen_cfg, self.tokenizer.vocab_size)
            out += result.response_ids()
        return out

    def decode_response(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if ids and ids[-1] == self.tokenizer.eos_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids)

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        """Greedy; ``max_new_tokens`` is capped at half the model's positions so a prompt always fits."""
        bos = self.tokenizer.bos_id is not None
        ids = [self.tokenizer.encode(p, add_bos=bos) for p in prompts]
        new = max(1, min(max_new_tokens, self.max_length // 2))
        return [truncate_at_stop(self.decode_response(r), stop) for r in self.generate_ids(ids, new)]


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
        for rows in _batches(len(sequences), self.batch_size):
            seqs = [list(sequences[i])[-self.max_length :] for i in rows]
            if any(not s for s in seqs):
                raise ValueError("an empty sequence has no reward")
            tokens = _right_pad(seqs, self.pad_id)
            values = megatron_logits(self.chunk, tokens, 1)  # [b, s, 1] on the last stage
            last = None
            if values is not None:
                index = torch.tensor([len(s) - 1 for s in seqs], device=values.device)
                last = values[:, :, 0].gather(1, index[:, None]).squeeze(1).float().contiguous()
            out += _share_from_last_stage(last, [len(seqs)]).cpu().tolist()
        return out
