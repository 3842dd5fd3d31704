"""One forward+backward through megatron's real pipeline schedule at the launched TP/PP/VPP layout.

``--init`` (single process): build a model from the seed and save it as a c2f checkpoint first. Every run
loads that checkpoint (so all layouts hold the same weights), runs ``get_forward_backward_func`` over
several micro-batches, and rank 0 of the last stage saves logits, per-micro-batch losses and the
gradient norm of a few parameters to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from c2f_megatron.checkpoint.megatron_dir import (
    CheckpointMetadata,
    load_model_checkpoint,
    save_model_checkpoint,
)
from c2f_megatron.models import ModelConfig, build_model_chunks, mask_padded_vocab, position_ids_for
from c2f_megatron.platform import ParallelConfig, destroy_distributed, init_distributed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--init", action="store_true")
    p.add_argument("--model", default="{}", help="JSON ModelConfig overrides")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq", type=int, default=24)
    args = p.parse_args()

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    init_distributed(ParallelConfig(args.tp, args.pp, args.vpp, seed=1234))
    cfg = ModelConfig(**json.loads(args.model))
    chunks = build_model_chunks(cfg)
    if args.init:
        save_model_checkpoint(chunks, args.ckpt, CheckpointMetadata(model=cfg), force=True)
    load_model_checkpoint(chunks, args.ckpt)

    gen = torch.Generator().manual_seed(7)
    n, mbs, seq = args.micro_batches, args.micro_batch_size, args.seq
    tokens = torch.randint(0, cfg.vocab_size, (n, mbs, seq + 1), generator=gen)
    # one iterator per model chunk: every chunk's forward_step draws its own copy of each micro-batch
    iterators = [iter([tokens[i] for i in range(n)]) for _ in chunks]
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    collected_logits: list[torch.Tensor] = []
    losses: list[float] = []

    def loss_func(labels: torch.Tensor, logits: torch.Tensor):
        local_vocab = logits.shape[-1]
        logits = mask_padded_vocab(logits, cfg.vocab_size, vocab_start=tp_rank * local_vocab)
        per_token = vocab_parallel_cross_entropy(logits.float().contiguous(), labels)
        loss = per_token.sum()
        num = torch.tensor(labels.numel(), dtype=torch.int)
        full = torch.cat(_gather_tp(logits.detach()), dim=-1)[..., : cfg.vocab_size]
        collected_logits.append(full)
        losses.append(loss.item() / labels.numel())
        return loss, num, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        logits = model(inputs, position_ids_for(inputs), None)
        return logits, partial(loss_func, labels)

    config = chunks[0].config
    config.finalize_model_grads_func = None
    forward_backward = get_forward_backward_func()
    forward_backward(
        forward_step_func=forward_step,
        data_iterator=iterators[0] if len(chunks) == 1 else iterators,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=n,
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=False,
    )
    grad_sq = torch.zeros(())
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if param.grad is not None and "embedding" not in name and "output_layer" not in name:
                grad_sq += _global_grad_sq(name, param)
    grad_sq = _reduce_over_model(grad_sq)
    is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if is_last and tp_rank == 0:
        torch.save(
            {"logits": torch.stack(collected_logits), "losses": losses, "grad_sq": grad_sq.item()}, args.out
        )
    destroy_distributed()


def _gather_tp(t: torch.Tensor) -> list[torch.Tensor]:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return parts


def _global_grad_sq(name: str, param: torch.nn.Parameter) -> torch.Tensor:
    """Squared grad norm of the global parameter: TP-replicated params (norms) count once."""
    from megatron.core import parallel_state

    sq = param.grad.float().pow(2).sum()
    if not getattr(param, "tensor_model_parallel", False) and parallel_state.get_tensor_model_parallel_rank():
        return torch.zeros(())
    return sq


def _reduce_over_model(x: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    torch.distributed.all_reduce(x, group=parallel_state.get_model_parallel_group())
    return x


if __name__ == "__main__":
    main()
