"""Rollout throughput: ``generation.rollout.generate`` against HF ``generate`` (KV cache) on the same weights
and prompts, and against the code before a change (``--before TREE``), in one run.

Default model: SmolLM2-135M-Instruct (the packaged GGUF, converted to fp32 HF and c2f checkpoints under
``--work-dir``) on ``--batch`` held-out HH-RLHF prompts in its chat template (left-padded to the longest).
``--preset NAME`` instead builds that preset with random weights on random prompts of ``--prompt`` ids,
and HF ``MistralForCausalLM`` holding the same weights (``checkpoint.convert.hf_tensors_of``).
Both decode greedily for exactly ``--new`` tokens with EOS suppressed (coarse mode; HF:
``min_new_tokens``). Prints tokens/s, the ratios ours / HF and ours / before (> 1 means faster), and how
many greedy tokens agree. On a GPU it also prints the bandwidth bound (every weight and the KV cache read
once per step) and the fraction of it reached.

    python benchmarks/rollout.py [--batch 16] [--new 128] [--before /tmp/before] [--preset mistral-tiny]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from bench_common import (
    check_before_tree,
    emit,
    first_mismatch,
    hh_prompt_ids,
    run_before,
    smollm2,
    source_of_c2f,
    timed,
)


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


def load(args):
    """(megatron model chunk, model config, prompts, eos id, HF model or None)."""
    from c2f_megatron.platform import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(seed=0))
    if args.preset:
        from c2f_megatron.models import build_gpt_model, get_preset

        cfg = get_preset(
            args.preset, params_dtype=args.dtype, max_position_embeddings=max(512, args.prompt + args.new)
        )
        model = build_gpt_model(cfg).eval()
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt), generator=g).tolist()
        hf = None if args.ours_only else hf_model_from(model, cfg)
        return model, cfg, prompts, 2, hf
    from c2f_megatron.data.tokenizer import load_tokenizer
    from c2f_megatron.engine.role_model import RoleModel

    ckpt, hf_dir = smollm2(Path(args.work_dir))
    role = RoleModel.from_checkpoint("gpt", "gpt", ckpt, runtime={"layer_spec": "sdpa"})
    tokenizer = load_tokenizer(str(ckpt / "tokenizer"))
    prompts = hh_prompt_ids(tokenizer, args.batch)
    hf = None
    if not args.ours_only:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
        hf.eval()
    return role.module, role.model_cfg, prompts, tokenizer.eos_id, hf


def ours(model, cfg, prompts, eos: int, new: int, repeats: int, cuda_graph: bool = False):
    """(responses [b][new], seconds) of our rollout, greedy, EOS suppressed."""
    from c2f_megatron.generation.rollout import GenerationConfig, generate
    from c2f_megatron.platform.role_layout import global_layout

    gen = GenerationConfig(
        max_new_tokens=new, greedy=True, suppress_ids=[eos], pad_id=eos, cuda_graph=cuda_graph
    )
    warm = GenerationConfig(2, greedy=True, cuda_graph=cuda_graph)
    generate(model, global_layout(), prompts, warm, cfg.vocab_size)  # warm-up
    batch, seconds = timed(lambda: generate(model, global_layout(), prompts, gen, cfg.vocab_size), repeats)
    return batch.responses.cpu().tolist(), seconds


def theirs(hf, prompts, eos: int, new: int, repeats: int):
    """(responses, seconds) of HF ``generate`` on the same prompts, left-padded, KV cache, greedy."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), eos, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    dev = next(hf.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)

    def run(n: int):
        with torch.no_grad():
            return hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=eos,
            )

    run(2)
    out, seconds = timed(lambda: run(new), repeats)
    return out[:, width:].cpu().tolist(), seconds


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--preset", default=None, help="a model preset with random weights instead of SmolLM2"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32, help="prompt ids (--preset only)")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="--preset only")
    parser.add_argument("--work-dir", default=None, help="where SmolLM2 is converted (default: a temp dir)")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="GPU: decode steps replayed from a CUDA graph"
    )
    parser.add_argument("--before", default=None, help="a checkout of the code to compare against")
    parser.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)  # the --before child
    parser.add_argument(
        "--peak-bandwidth", type=float, default=4.8e12, help="memory bandwidth of one GPU, bytes/s (H200)"
    )
    args = parser.parse_args()
    if args.before:
        check_before_tree(args.before)
    with tempfile.TemporaryDirectory() as tmp:
        args.work_dir = args.work_dir or tmp
        model, cfg, prompts, eos, hf = load(args)
        mine, t_ours = ours(model, cfg, prompts, eos, args.new, args.repeats, args.cuda_graph)
        if args.ours_only:
            emit({"responses": mine, "seconds": t_ours, "source": source_of_c2f()})
            return
        hf_tokens, t_hf = theirs(hf, prompts, eos, args.new, args.repeats)
        before = None
        if args.before:
            child = [
                "--ours-only",
                "--batch",
                str(args.batch),
                "--new",
                str(args.new),
                "--work-dir",
                args.work_dir,
            ]
            child += ["--repeats", str(args.repeats)]
            if args.preset:
                child += ["--preset", args.preset, "--prompt", str(args.prompt), "--dtype", args.dtype]
            before = run_before(args.before, __file__, child)

    n_tokens = len(prompts) * args.new
    lengths = [len(p) for p in prompts]
    print(
        f"device={next(model.parameters()).device.type} threads={torch.get_num_threads()} "
        f"model={args.preset or 'SmolLM2-135M-Instruct'} dtype={cfg.params_dtype} batch={len(prompts)} "
        f"prompt ids {min(lengths)}-{max(lengths)} new={args.new} params={cfg.num_parameters() / 1e6:.1f}M"
    )
    print(f"megatron generate (ours):     {n_tokens / t_ours:9.1f} tokens/s  ({t_ours:.2f} s)")
    print(f"HF generate (KV cache):       {n_tokens / t_hf:9.1f} tokens/s  ({t_hf:.2f} s)")
    print(f"ratio ours / HF:              {t_hf / t_ours:9.2f}")
    agree = sum(a == b for r, h in zip(mine, hf_tokens) for a, b in zip(r, h)) / n_tokens
    print(
        f"greedy tokens equal to HF:    {agree:9.1%}  (first mismatch per row: "
        f"{[first_mismatch(r, h) for r, h in zip(mine, hf_tokens)]})"
    )
    if before:
        t_before = before["seconds"]
        same = sum(r == b for r, b in zip(mine, before["responses"]))
        print(f"before ({before['source']}): {n_tokens / t_before:9.1f} tokens/s  ({t_before:.2f} s)")
        print(f"ratio ours / before:          {t_before / t_ours:9.2f}")
        print(f"greedy rows equal to before:  {same:>5}/{len(mine)}")
    if torch.cuda.is_available():
        # a decode step reads every weight and the KV cache written so far once: the bandwidth bound
        item = 2 if cfg.params_dtype == "bf16" else 4
        weights = sum(p.numel() for p in model.parameters()) * item
        mean_context = sum(lengths) / len(lengths) + args.new / 2
        kv = 2 * cfg.num_layers * cfg.num_query_groups * cfg.head_dim * item * len(prompts) * mean_context
        bound_s = args.new * (weights + kv) / args.peak_bandwidth
        print(
            f"bandwidth bound:              {n_tokens / bound_s:9.1f} tokens/s  (weights {weights / 1e9:.2f} GB + "
            f"mean KV {kv / 1e9:.2f} GB per step at {args.peak_bandwidth / 1e12:.1f} TB/s); ours at "
            f"{100 * bound_s / t_ours:.1f}% of it"
        )


if __name__ == "__main__":
    main()
