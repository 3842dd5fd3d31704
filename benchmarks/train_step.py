"""Throughput of the shared train step (``c2f_megatron.engine.RoleModel.train_step``) for a model preset.

Prints tokens/s and, on a GPU, model FLOPs utilisation: (6 N + 12 L h s) FLOPs per token (N = parameters
doing matmuls: all but the input embedding; the second term is attention scores and context, PaLM's
accounting) over ``--peak-flops`` per GPU (default 989e12, H100 SXM dense bf16).

    python benchmarks/train_step.py --preset mistral-tiny                 # CPU, world of 1
    torchrun --nproc_per_node=8 benchmarks/train_step.py --preset mistral-7b-v0.1 --tp 4 --pp 2 \
        --micro-batch 1 --seq 4096 --num-micro 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def flops_per_token(model_cfg, seq: int) -> float:
    matmul_params = model_cfg.num_parameters() - model_cfg.vocab_size * model_cfg.hidden_size
    if not model_cfg.untie_embeddings_and_output_weights:  # the tied output layer still multiplies
        matmul_params += model_cfg.vocab_size * model_cfg.hidden_size
    return 6.0 * matmul_params + 12.0 * model_cfg.num_layers * model_cfg.hidden_size * seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mistral-tiny")
    parser.add_argument("--layer-spec", default="auto", choices=["auto", "te", "sdpa", "local"])
    parser.add_argument(
        "--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: the preset's"
    )
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--num-micro", type=int, default=1, help="micro-batches per step on each DP rank")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--peak-flops", type=float, default=989e12, help="peak FLOP/s of one GPU")
    args = parser.parse_args()

    from megatron.core import parallel_state

    from c2f_megatron.engine import OptimConfig, RoleModel
    from c2f_megatron.models.config import get_preset
    from c2f_megatron.models.specs import resolve_layer_spec
    from c2f_megatron.platform.distributed import (
        ParallelConfig,
        device,
        init_distributed,
        is_rank_zero,
        use_cuda,
    )
    from c2f_megatron.training.tasks.lm import collate_windows, token_forward_step

    init_distributed(ParallelConfig(args.tp, args.pp))
    overrides = {"layer_spec": args.layer_spec, "max_position_embeddings": max(args.seq, 512)}
    if args.dtype:
        overrides["params_dtype"] = args.dtype
    model_cfg = get_preset(args.preset, **overrides)
    optim = OptimConfig(lr=1e-4, use_distributed_optimizer=args.distributed_optimizer)
    tm = RoleModel.build("model", "gpt", model_cfg, optim=optim, train_steps=args.steps + args.warmup)
    g = torch.Generator().manual_seed(0)
    micro = [
        collate_windows(
            torch.randint(3, model_cfg.vocab_size, (args.micro_batch, args.seq + 1), generator=g).tolist(),
            device(),
        )
        for _ in range(args.num_micro)
    ]
    forward = lambda it, model: token_forward_step(model_cfg.vocab_size, it, model)  # noqa: E731
    times = []
    for i in range(args.warmup + args.steps):
        if use_cuda():
            torch.cuda.synchronize()
        start = time.perf_counter()
        tm.train_step(forward, micro, args.seq, args.micro_batch)
        if use_cuda():
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)

    dp = parallel_state.get_data_parallel_world_size()
    world = torch.distributed.get_world_size()
    tokens = args.micro_batch * args.num_micro * args.seq * dp
    step_s = statistics.median(times)
    if is_rank_zero():
        print(
            f"preset {args.preset} ({model_cfg.num_parameters() / 1e6:.1f}M params, {model_cfg.params_dtype}), "
            f"layer spec {resolve_layer_spec(model_cfg.layer_spec)}, device {device().type}, "
            f"TP {args.tp} PP {args.pp} DP {dp}, {tokens} tokens/step ({args.num_micro} x {args.micro_batch} x "
            f"{args.seq} x DP)"
        )
        print(f"step time median {step_s * 1e3:.1f} ms (min {min(times) * 1e3:.1f}) over {len(times)} steps")
        print(f"tokens/s {tokens / step_s:,.0f} total, {tokens / step_s / world:,.0f} per process")
        if use_cuda():
            achieved = flops_per_token(model_cfg, args.seq) * tokens / step_s / world
            print(
                f"MFU {100 * achieved / args.peak_flops:.1f}% ({achieved / 1e12:.1f} TFLOP/s per GPU of "
                f"{args.peak_flops / 1e12:.0f} peak)"
            )
        else:
            print("MFU: n/a on CPU (needs a GPU and its peak FLOP/s)")


if __name__ == "__main__":
    main()
