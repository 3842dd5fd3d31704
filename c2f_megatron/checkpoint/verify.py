"""Logits of a Megatron model shard, and the converter's check that they equal the Hugging Face model's.

``megatron_logits`` runs one forward (through megatron's forward-only pipeline schedule with PP > 1, TP
output gathered) and returns full-vocabulary logits on the last pipeline stage; evaluation scores with it
too. ``verify_against_hf`` compares them with transformers' on a fixed token batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from c2f_megatron.checkpoint.hf_mapping import ConversionError
from c2f_megatron.models.config import DTYPES, ModelConfig


def verify_tokens(vocab_size: int, seq_len: int, batch: int = 2) -> Tensor:
    """A fixed, vocabulary-spread token batch (no randomness, so every rank and run sees the same)."""
    ids = torch.arange(batch * seq_len, dtype=torch.long).reshape(batch, seq_len)
    return (ids * 7919 + 13) % vocab_size


def megatron_logits(chunk: torch.nn.Module, tokens: Tensor, vocab_size: int) -> Tensor | None:
    """Full-vocab logits [b, s, vocab] of a model shard, on the last pipeline stage (None elsewhere).

    With PP > 1 this runs megatron's forward-only pipeline schedule; TP output is gathered by the model.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from c2f_megatron.models.gpt import position_ids_for
    from c2f_megatron.platform.distributed import device

    tokens = tokens.to(device())
    chunk.eval()
    with torch.no_grad():
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return chunk(tokens, position_ids_for(tokens), None, runtime_gather_output=True)[
                ..., :vocab_size
            ].float()

        def forward_step(_iterator, model):
            out = model(tokens, position_ids_for(tokens), None, runtime_gather_output=True)
            return out, lambda output, non_loss_data=False: output

        collected = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[chunk],
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return collected[0][..., :vocab_size].float()


def hf_logits(hf_dir: Path, tokens: Tensor, dtype: torch.dtype) -> Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        logits = model(tokens).logits.float()
    del model
    return logits


def verify_against_hf(
    chunk: torch.nn.Module, cfg: ModelConfig, hf_dir: Path, seq_len: int, tolerance: float | None
) -> tuple[float, float]:
    """Max |logit difference| between the megatron shard(s) and the HF model; raises above tolerance.

    Only one rank (last pipeline stage, TP rank 0, DP rank 0) loads the HF model; the result is shared.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    tokens = verify_tokens(cfg.vocab_size, min(seq_len, cfg.max_position_embeddings))
    ours = megatron_logits(chunk, tokens, cfg.vocab_size)
    result = torch.zeros(2, dtype=torch.float64)
    judge = (
        ours is not None
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )
    if judge:
        theirs = hf_logits(hf_dir, tokens, DTYPES[cfg.params_dtype])
        diff = (ours.cpu() - theirs).abs().max().item()
        tol = (
            tolerance
            if tolerance is not None
            else (1e-4 if cfg.params_dtype == "fp32" else 0.02 * max(1.0, theirs.abs().max().item()))
        )
        result[0], result[1] = diff, tol
    if dist.is_initialized():
        dist.all_reduce(result, op=dist.ReduceOp.MAX)
    diff, tol = float(result[0]), float(result[1])
    if not diff <= tol:  # also catches NaN
        raise ConversionError(
            f"--verify failed: max |logit difference| HF vs megatron {diff:.3e} > {tol:.1e}"
        )
    return diff, tol
