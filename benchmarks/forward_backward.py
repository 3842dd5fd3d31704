"""Training-step throughput: c2f-megatron's GPTModel vs HF ``MistralForCausalLM``, same config and batch.

Reference: HF transformers ``MistralForCausalLM`` (attn_implementation="sdpa"), forward + loss + backward.
Ours: megatron ``GPTModel`` from ``build_gpt_model`` with each available layer spec, forward + megatron's
vocab-parallel cross entropy + backward. Prints tokens/s and the ratio ours / HF (> 1 means faster).

    python benchmarks/forward_backward.py [--preset mistral-tiny] [--batch 4] [--seq 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def time_steps(step, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mistral-tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from transformers import MistralConfig, MistralForCausalLM

    from c2f_megatron.models import build_gpt_model, get_preset, position_ids_for
    from c2f_megatron.models.specs import resolve_layer_spec
    from c2f_megatron.platform import ParallelConfig, device, init_distributed

    init_distributed(ParallelConfig(seed=0))
    dev = device()
    cfg = get_preset(args.preset, params_dtype=args.dtype, max_position_embeddings=max(args.seq, 512))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=dev)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    n_tokens = args.batch * args.seq
    print(
        f"device={dev.type} threads={torch.get_num_threads()} preset={args.preset} dtype={args.dtype} "
        f"batch={args.batch}x{args.seq} params={cfg.num_parameters() / 1e6:.1f}M"
    )

    hf_cfg = MistralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.rotary_base,
        sliding_window=cfg.sliding_window,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    hf = MistralForCausalLM(hf_cfg).to(dev, dtype).train()

    def hf_step(hf=hf):
        hf.zero_grad(set_to_none=True)
        out = hf(input_ids=inputs, labels=tokens[:, :-1].clone())
        out.loss.backward()

    hf_time = time_steps(hf_step, args.steps)
    hf_tps = n_tokens / hf_time
    print(
        f"{'HF MistralForCausalLM (sdpa)':34s} {hf_time * 1000:8.1f} ms/step {hf_tps:10.0f} tokens/s  (reference)"
    )
    del hf

    specs = ["sdpa", "local"] + (["te"] if resolve_layer_spec("auto") == "te" else [])
    pos = position_ids_for(inputs)
    for spec in specs:
        model = build_gpt_model(
            get_preset(
                args.preset,
                params_dtype=args.dtype,
                layer_spec=spec,
                max_position_embeddings=max(args.seq, 512),
            )
        ).train()

        def step(model=model):
            model.zero_grad(set_to_none=True)
            logits = model(inputs, pos, None)
            loss = vocab_parallel_cross_entropy(logits.float().contiguous(), labels).mean()
            loss.backward()

        t = time_steps(step, args.steps)
        tps = n_tokens / t
        print(
            f"{'c2f-megatron GPTModel (' + spec + ')':34s} {t * 1000:8.1f} ms/step {tps:10.0f} tokens/s  "
            f"ratio vs HF: {tps / hf_tps:.2f}x"
        )
        del model


if __name__ == "__main__":
    main()
