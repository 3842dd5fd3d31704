"""Rollout throughput: ``c2f_megatron.generation.rollout.generate`` vs HF ``generate`` (KV cache), same weights and batch.

Ours: megatron ``GPTModel`` (``build_gpt_model``) driven with a ``StaticInferenceContext`` KV cache.
Reference: HF transformers ``MistralForCausalLM`` (attn_implementation="sdpa") holding the same weights,
copied with the converter's mapping (``checkpoint.convert.hf_tensors_of``), ``generate(use_cache=True)``.
Both decode greedily for exactly ``--new`` tokens from the same prompts (equal length, so neither pads).
Prints generated tokens/s for both, the ratio ours / HF (> 1 means faster) and how many greedy tokens agree.

    python benchmarks/rollout.py [--preset mistral-tiny] [--batch 8] [--prompt 32] [--new 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def hf_model_from(model, cfg):
    """``MistralForCausalLM`` with the megatron model's weights (TP=PP=1), in eval mode."""
    from transformers import MistralConfig, MistralForCausalLM

    from c2f_megatron.checkpoint import hf_mapping as hm
    from c2f_megatron.checkpoint.convert import hf_tensors_of
    from c2f_megatron.models.config import DTYPES
    from c2f_megatron.models.specs import resolve_layer_spec

    hf_cfg = hm.hf_config_from_model(cfg, cfg.params_dtype)
    hf = MistralForCausalLM(MistralConfig(**hf_cfg, attn_implementation="sdpa"))
    spec = resolve_layer_spec(cfg.layer_spec)
    state = {}
    for name, param in model.named_parameters():
        rule, layer = hm.rule_for(name, spec)
        state.update(hf_tensors_of(name, param, rule, layer, cfg))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"weight copy incomplete: missing={missing} unexpected={unexpected}")
    return hf.to(dtype=DTYPES[cfg.params_dtype], device=next(model.parameters()).device).eval()


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mistral-tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument(
        "--peak-bandwidth", type=float, default=4.8e12, help="memory bandwidth of one GPU, bytes/s (H200)"
    )
    args = parser.parse_args()

    from c2f_megatron.generation.rollout import GenerationConfig, generate
    from c2f_megatron.models import build_gpt_model, get_preset
    from c2f_megatron.platform import ParallelConfig, device, init_distributed
    from c2f_megatron.platform.role_layout import global_layout

    init_distributed(ParallelConfig(seed=0))
    dev = device()
    cfg = get_preset(
        args.preset, params_dtype=args.dtype, max_position_embeddings=max(512, args.prompt + args.new)
    )
    model = build_gpt_model(cfg).eval()
    hf = hf_model_from(model, cfg)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt), generator=g)
    n_tokens = args.batch * args.new
    print(
        f"device={dev.type} threads={torch.get_num_threads()} preset={args.preset} dtype={args.dtype} "
        f"batch={args.batch} prompt={args.prompt} new={args.new} params={cfg.num_parameters() / 1e6:.1f}M"
    )

    gen_cfg = GenerationConfig(max_new_tokens=args.new, greedy=True, pad_id=0)
    ours_out = {}

    def ours() -> None:
        ours_out["batch"] = generate(model, global_layout(), prompts.tolist(), gen_cfg, cfg.vocab_size)

    hf_in = prompts.to(dev)
    hf_out = {}

    def theirs() -> None:
        with torch.no_grad():
            hf_out["tokens"] = hf.generate(
                hf_in,
                attention_mask=torch.ones_like(hf_in),
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )

    generate(
        model,
        global_layout(),
        prompts.tolist(),
        GenerationConfig(max_new_tokens=4, greedy=True),
        cfg.vocab_size,
    )
    hf.generate(
        hf_in, attention_mask=torch.ones_like(hf_in), max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    t_ours = best_time(ours, args.repeats)
    t_hf = best_time(theirs, args.repeats)
    ours_tokens = ours_out["batch"].responses.cpu()
    hf_tokens = hf_out["tokens"][:, args.prompt :].cpu()
    agree = (ours_tokens == hf_tokens).float().mean().item()
    first = [
        next((j for j in range(args.new) if ours_tokens[i, j] != hf_tokens[i, j]), None)
        for i in range(args.batch)
    ]
    print(f"megatron generate (KV cache): {n_tokens / t_ours:9.1f} tokens/s  ({t_ours:.2f} s)")
    print(f"HF generate (KV cache):       {n_tokens / t_hf:9.1f} tokens/s  ({t_hf:.2f} s)")
    print(f"ratio megatron / HF:          {t_hf / t_ours:9.2f}")
    print(f"greedy tokens equal:          {agree:9.1%}  (first mismatch per row: {first})")
    if dev.type == "cuda":
        # a decode step reads every weight and the KV cache written so far once: the bandwidth bound
        item = 2 if args.dtype == "bf16" else 4
        weights = sum(p.numel() for p in model.parameters()) * item
        mean_context = args.prompt + args.new / 2
        kv = 2 * cfg.num_layers * cfg.num_query_groups * cfg.head_dim * item * args.batch * mean_context
        bound_s = args.new * (weights + kv) / args.peak_bandwidth
        print(
            f"bandwidth bound:              {n_tokens / bound_s:9.1f} tokens/s  (weights {weights / 1e9:.2f} GB + "
            f"mean KV {kv / 1e9:.2f} GB per step at {args.peak_bandwidth / 1e12:.1f} TB/s); megatron at "
            f"{100 * bound_s / t_ours:.1f}% of it"
        )


if __name__ == "__main__":
    main()
