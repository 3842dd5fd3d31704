"""``c2f coarse-actor CONFIG.yaml [key.path=value ...]``: PPO for the Coarse Actor with the CM length limit.

Launch one process per device (``torchrun --nproc_per_node=N -m c2f_megatron.cli coarse-actor cfg.yaml``, or
``srun``; see ``slurm/coarse_actor.sbatch``). Exit codes: 0 done (or stopped by
``checkpoint.exit_after_iterations``), 2 bad config or input.
"""

from __future__ import annotations

import sys
from typing import Any

from c2f_megatron.config import ConfigError, help_kwargs, load_config, to_dict


def register(subparsers: Any) -> None:
    from c2f_megatron.rl.config import PPOJobConfig
    from c2f_megatron.training.cli import add_verbose_flag, with_verbose

    help_text = "Coarse Actor: PPO with the Continuous Maximization length limit"
    parser = subparsers.add_parser(
        "coarse-actor",
        help=help_text,
        description=help_text,
        **help_kwargs(PPOJobConfig),
    )
    parser.add_argument("config", help="job YAML (see examples/coarse_actor_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. ppo.iterations=10")
    add_verbose_flag(parser)
    parser.set_defaults(func=lambda args: main(args.config, with_verbose(args)))


def main(config_path: str | None, overrides: list[str]) -> int:
    from c2f_megatron.rl.config import PPOJobConfig

    try:
        cfg = load_config(PPOJobConfig, config_path, overrides)
    except ConfigError as exc:
        print(f"c2f coarse-actor: {exc}", file=sys.stderr)
        return 2
    from c2f_megatron.checkpoint.megatron_dir import CheckpointError
    from c2f_megatron.platform.distributed import init_distributed
    from c2f_megatron.rl.ppo_trainer import run
    from c2f_megatron.training.run_loop import NonFiniteLossError

    init_distributed(cfg.parallel)
    try:
        run(cfg, config_dump=to_dict(cfg))
    except (ConfigError, CheckpointError, OSError, ValueError) as exc:
        # configuration problems found once the world size is known (e.g. batch sizes per DP rank)
        print(f"c2f coarse-actor: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:  # as the trainers: exit 3, the last good checkpoint named
        print(f"c2f coarse-actor: {exc}", file=sys.stderr)
        return 3
    return 0
