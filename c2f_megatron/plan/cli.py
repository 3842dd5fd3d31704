"""``c2f plan CONFIG [key=value ...]``: will this job fit? Per GPU, every role and every phase.

Runs in one CPU process with no GPU: each role's model is built rank by rank on the meta device (megatron's
real ``GPTModel`` and DDP buffers, no memory), so the weight, gradient and optimizer bytes are the real
shards'. ``--json`` writes the figures for scripts (``benchmarks/gpu_check.sh`` compares them with
``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COMMANDS = ("train-lm", "train-sft", "train-rm", "coarse-actor", "pipeline")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="per-GPU memory of every role of a job, before it runs",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("config", help="a job YAML: trainer, coarse-actor or pipeline (see examples/)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, as the job's command takes")
    parser.add_argument(
        "--gpus", type=int, default=None, help="GPUs of the job (default: the fewest its layouts allow)"
    )
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument(
        "--job", choices=COMMANDS, default=None, help="the command the YAML is for (default: detected)"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from c2f_megatron.checkpoint.megatron_dir import CheckpointError
    from c2f_megatron.config import ConfigError

    if args.gpus is not None and args.gpus < 1:
        print(f"c2f plan: --gpus must be >= 1, got {args.gpus}", file=sys.stderr)
        return 2
    try:
        from c2f_megatron.plan.jobs import plan_jobs
        from c2f_megatron.plan.report import phases, render, role_memory, to_json

        jobs = plan_jobs(args.config, list(args.overrides), args.gpus, args.job)
        gpu = args.gpu_memory * 1024**3
        results = []
        for job in jobs:
            roles = [role_memory(r, job.rollout) for r in job.roles]
            plan_phases = phases(job, roles)
            print(render(job, roles, plan_phases, gpu), flush=True)
            print()
            results.append(to_json(job, roles, plan_phases, gpu))
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:
        print(f"c2f plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        from c2f_megatron.files import write_atomic

        write_atomic(Path(args.json), json.dumps(results, indent=1))
    return 0
