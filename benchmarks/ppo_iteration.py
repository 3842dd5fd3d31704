"""Time split of one Coarse Actor PPO iteration: rollout, scoring (actor / reference log-probs, critic values,
reward), GAE, PPO update. Synthetic prompts and a programmatic reward by default (no data or RM needed);
``--config`` runs any ``c2f coarse-actor`` YAML instead (e.g. with a reward model). ``--before TREE`` runs
the same iterations with the code of another checkout (``bench_common.run_before``) and prints the time
ratio and the largest difference of the last iteration's metrics (update statistics, rewards, KL). The
SmolLM2 config below comes from ``c2f pipeline examples/pipeline_demo_smollm2.yaml run_dir=runs/demo_fp32
base.dtype=fp32`` (README's figures add ``length.cm.initial_length=48 data.max_prompt_length=128``).

    python benchmarks/ppo_iteration.py --preset mistral-nano                     # CPU, world of 1
    python benchmarks/ppo_iteration.py --config runs/demo_fp32/coarse/job.yaml --iterations 3 --before /tmp/before
    torchrun --nproc_per_node=8 benchmarks/ppo_iteration.py --preset mistral-1b --tp 2 --batch 64 --length 512
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_common import check_before_tree, emit, run_before


def timed(fn, *args):
    from c2f_megatron.platform.distributed import use_cuda

    if use_cuda():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if use_cuda():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", default=None, help="a coarse-actor YAML (the flags below are then ignored)"
    )
    parser.add_argument("--preset", default="mistral-nano")
    parser.add_argument("--layer-spec", default="sdpa", choices=["auto", "te", "sdpa", "local"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="prompts per iteration (all DP ranks)")
    parser.add_argument("--mini-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="rollout length limit (max_new_tokens)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--iterations",
        type=int,
        default=2,
        help="the first warms up; the others are summed, the last one's metrics compared",
    )
    parser.add_argument("--before", default=None, help="a checkout of the code to compare against")
    parser.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)  # the --before child
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of the job config")
    args = parser.parse_args()
    if args.before:
        check_before_tree(args.before)

    from c2f_megatron.config import load_config
    from c2f_megatron.generation.rollout import GenerationConfig
    from c2f_megatron.platform.distributed import init_distributed, is_rank_zero
    from c2f_megatron.rl.config import PPOJobConfig
    from c2f_megatron.rl.experience import (
        Experience,
        finalize,
        gather_experience,
        normalize_scores,
    )
    from c2f_megatron.rl.ppo_trainer import ppo_update
    from c2f_megatron.rl.prompts import iteration_prompts
    from c2f_megatron.rl.roles import build_workers

    if args.config:
        overrides = list(args.overrides)
    else:
        overrides = [
            f"model.preset={args.preset}",
            f"model.overrides.layer_spec={args.layer_spec}",
            f"parallel.tensor_model_parallel_size={args.tp}",
            f"parallel.pipeline_model_parallel_size={args.pp}",
            f"ppo.rollout_batch_size={args.batch}",
            f"ppo.mini_batch_size={args.mini_batch}",
            f"ppo.micro_batch_size={args.micro_batch}",
            f"ppo.epochs={args.epochs}",
            "reward.kind=token_frequency",
            "data.source=synthetic",
            f"data.synthetic.min_len={args.prompt_len}",
            f"data.synthetic.max_len={args.prompt_len}",
            "logging.wandb_mode=disabled",
            *args.overrides,
        ]
    cfg = load_config(PPOJobConfig, args.config, overrides)
    init_distributed(cfg.parallel)
    if args.before and torch.distributed.get_world_size() > 1:
        raise SystemExit("--before compares runs in a world of 1 (no torchrun)")
    w = build_workers(cfg)
    dp_size, dp_rank = w.actor.layout.dp, w.actor.layout.dp_rank
    length = args.length if not args.config else cfg.length.cm.initial_length
    report, measured = {}, {}
    for it in range(args.iterations):
        prompts, offset = iteration_prompts(
            w.source, it, cfg.ppo.rollout_batch_size, cfg.ppo.seed, dp_rank, dp_size
        )
        gen = GenerationConfig(
            max_new_tokens=length,
            temperature=cfg.generation.temperature,
            suppress_ids=list(w.actor.suppressed),
            pad_id=w.source.pad_id,
            seed=it,
        )
        t: dict[str, float] = {}
        rollout, t["rollout"] = timed(w.actor.generate, prompts, gen, offset)
        exp = gather_experience(Experience.from_rollout(rollout), w.actor.layout, w.source.pad_id)
        (exp.old_logprobs, exp.entropy, exp.eos_mass), t["actor_logprobs"] = timed(
            w.actor.compute_log_probs, exp
        )
        exp.ref_logprobs, t["ref_logprobs"] = timed(w.reference.compute_log_probs, exp)
        exp.values, t["critic_values"] = timed(w.critic.compute_values, exp)
        exp.raw_scores, t["reward"] = timed(w.reward.score, exp)
        exp.scores = normalize_scores(exp.raw_scores, w.reward.mean, w.reward.std, cfg.reward.clip)
        _, t["gae"] = timed(finalize, exp, 0.05, cfg.ppo.kl_estimator, cfg.ppo.gamma, cfg.ppo.lam, True)
        update, t["ppo_update"] = timed(ppo_update, w, cfg, exp, it, True)
        metrics = {k: float(v) for k, v in update.items() if isinstance(v, (int, float))}
        metrics["score_mean"] = float(exp.raw_scores.mean())
        metrics["kl_mean"] = float(
            ((exp.old_logprobs - exp.ref_logprobs) * exp.response_mask).sum() / exp.response_mask.sum()
        )
        total = sum(t.values())
        tokens = exp.tokens.numel()
        report = {
            "iteration": it,
            "total_s": round(total, 3),
            "tokens_per_s": round(tokens / total, 1),
            **{f"{k}_s": round(v, 3) for k, v in t.items()},
            **{f"{k}_pct": round(100 * v / total, 1) for k, v in t.items()},
        }
        if is_rank_zero():
            print(json.dumps(report), flush=True)
        if it > 0 or args.iterations == 1:  # the first one warms up
            for k, v in t.items():
                measured[k] = measured.get(k, 0.0) + v
    # the iterations after the warm-up, summed (the same prompts and work for both checkouts)
    total = sum(measured.values())
    report = {
        "iterations": max(args.iterations - 1, 1),
        "total_s": round(total, 3),
        **{f"{k}_s": round(v, 3) for k, v in measured.items()},
        **{f"{k}_pct": round(100 * v / total, 1) for k, v in measured.items()},
    }
    if args.ours_only:
        if is_rank_zero():
            emit({"report": report, "metrics": metrics})
        return
    if is_rank_zero():
        print(
            f"{report['iterations']} PPO iteration(s) after the warm-up ({cfg.ppo.rollout_batch_size} prompts x "
            f"{length} new tokens; {w.layouts.describe()}): {report['total_s']} s = "
            + ", ".join(f"{k} {report[k + '_pct']}%" for k in t)
        )
    if args.before and is_rank_zero():
        child = ["--ours-only", "--iterations", str(args.iterations), "--length", str(args.length)]
        if args.config:
            child += ["--config", args.config]
        else:
            child += [
                f"--{k.replace('_', '-')}={getattr(args, k)}"
                for k in (
                    "preset",
                    "layer_spec",
                    "tp",
                    "pp",
                    "batch",
                    "mini_batch",
                    "micro_batch",
                    "prompt_len",
                    "epochs",
                )
            ]
        before = run_before(args.before, __file__, child + list(args.overrides))
        old = before["report"]
        print(f"before: {old['total_s']} s = " + ", ".join(f"{k} {old[k + '_s']} s" for k in t))
        print(
            f"ratio ours / before (iteration wall time): {old['total_s'] / report['total_s']:.2f}; "
            + ", ".join(f"{k} {old[k + '_s'] / max(report[k + '_s'], 1e-9):.2f}x" for k in t)
        )
        diffs = {k: abs(v - before["metrics"][k]) for k, v in metrics.items() if k in before["metrics"]}
        worst = max(diffs, key=diffs.get)
        print(
            f"metrics ({len(diffs)}): largest difference {diffs[worst]:.2e} ({worst}: ours {metrics[worst]:.6g}, "
            f"before {before['metrics'][worst]:.6g})"
        )


if __name__ == "__main__":
    main()
