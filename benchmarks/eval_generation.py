"""Fine-mode evaluation generation: ``MegatronLM.generate_ids`` (EOS ends a response) on held-out HH-RLHF
prompts, against the code before a change (``--before TREE``), in one run.

SmolLM2-135M-Instruct (the packaged GGUF, converted to an fp32 c2f checkpoint under ``--work-dir``), the
first ``--prompts`` held-out HH prompts in its chat template, greedy, up to ``--new`` tokens each, with
``--batch`` rows decoding at once (the pipeline's eval settings: 16 rows, 128 tokens). Prints generated
tokens/s, the ratio ours / before (> 1 means faster), how many responses are identical, and the response
lengths (what continuous batching follows).

    python benchmarks/eval_generation.py [--prompts 64] [--batch 16] [--new 128] [--before /tmp/before]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

from bench_common import check_before_tree, emit, hh_prompt_ids, run_before, smollm2, source_of_c2f, timed


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--work-dir", default=None, help="where SmolLM2 is converted (default: a temp dir)")
    parser.add_argument("--before", default=None, help="a checkout of the code to compare against")
    parser.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)  # the --before child
    args = parser.parse_args()
    if args.before:
        check_before_tree(args.before)

    from c2f_megatron.data.tokenizer import load_tokenizer
    from c2f_megatron.eval.megatron_model import MegatronLM
    from c2f_megatron.platform import ParallelConfig, init_distributed

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        init_distributed(ParallelConfig(seed=0))
        ckpt, _ = smollm2(work)
        tokenizer = load_tokenizer(str(ckpt / "tokenizer"))
        prompts = hh_prompt_ids(tokenizer, args.prompts)
        lm = MegatronLM.from_checkpoint(ckpt, tokenizer, batch_size=args.batch)
        lm.generate_ids(prompts[:2], 2)  # warm-up
        responses, seconds = timed(lambda: lm.generate_ids(prompts, args.new))
        if args.ours_only:
            emit({"responses": responses, "seconds": seconds, "source": source_of_c2f()})
            return
        before = None
        if args.before:
            child = ["--ours-only", "--prompts", str(args.prompts), "--batch", str(args.batch)]
            child += ["--new", str(args.new), "--work-dir", str(work)]
            before = run_before(args.before, __file__, child)

    tokens = sum(map(len, responses))
    lengths = [len(r) for r in responses]
    print(
        f"SmolLM2-135M-Instruct fp32, {len(prompts)} held-out HH prompts, greedy, up to {args.new} new tokens, "
        f"{args.batch} rows at once; response lengths {min(lengths)}-{max(lengths)} "
        f"(median {statistics.median(lengths):.0f}), {tokens} tokens"
    )
    print(f"ours:   {tokens / seconds:8.1f} tokens/s  ({seconds:.1f} s)")
    if before:
        b_tokens = sum(map(len, before["responses"]))
        same = sum(a == b for a, b in zip(responses, before["responses"]))
        print(
            f"before ({before['source']}): {b_tokens / before['seconds']:8.1f} tokens/s  ({before['seconds']:.1f} s)"
        )
        print(f"ratio ours / before (wall time): {before['seconds'] / seconds:.2f}")
        print(f"identical responses: {same}/{len(responses)}")


if __name__ == "__main__":
    main()
