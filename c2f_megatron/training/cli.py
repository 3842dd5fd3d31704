"""``c2f train-lm | train-sft | train-rm CONFIG.yaml [key.path=value ...]``.

Launch one process per device (``torchrun --nproc_per_node=N -m c2f_megatron.cli train-rm cfg.yaml``, or
``srun`` under Slurm); a plain call is a world of one. Exit codes: 0 done (or stopped by
``train.exit_after_steps``), 2 bad config or input, 3 stopped by the NaN guard.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from c2f_megatron.config import ConfigError, help_kwargs, load_config, to_dict

JOBS: dict[str, tuple[str, str, str]] = {
    # command: (module, job config class, help)
    "train-lm": ("c2f_megatron.training.tasks.lm", "LMJobConfig", "train a language model (next-token loss)"),
    "train-sft": (
        "c2f_megatron.training.tasks.sft",
        "SFTJobConfig",
        "supervised fine-tuning (loss on responses)",
    ),
    "train-rm": (
        "c2f_megatron.training.tasks.reward",
        "RMJobConfig",
        "train a reward model on preference pairs",
    ),
}


def register(subparsers: Any) -> None:
    import importlib

    selected = next((a for a in sys.argv[1:] if a in JOBS), None)
    for command, (module_name, class_name, help_text) in JOBS.items():
        extra = {}
        if command == selected:  # the config fields of the command asked for (its module imports torch)
            extra = help_kwargs(getattr(importlib.import_module(module_name), class_name))
        parser = subparsers.add_parser(command, help=help_text, description=help_text, **extra)
        parser.add_argument("config", help="job YAML (see examples/)")
        parser.add_argument(
            "overrides", nargs="*", help="key.path=value overrides, e.g. train.train_steps=10"
        )
        add_verbose_flag(parser)
        parser.set_defaults(func=_runner(command))


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="every metric on each progress line (= logging.verbose=true; metrics.jsonl always has them)",
    )


def with_verbose(args: argparse.Namespace) -> list[str]:
    """The overrides, plus ``logging.verbose=true`` under ``--verbose``."""
    return [*args.overrides, "logging.verbose=true"] if args.verbose else list(args.overrides)


def _runner(command: str) -> Callable[[argparse.Namespace], int]:
    def run_command(args: argparse.Namespace) -> int:
        return main(command, args.config, with_verbose(args))

    return run_command


def main(command: str, config_path: str | None, overrides: list[str]) -> int:
    import importlib

    module_name, class_name, _ = JOBS[command]
    module = importlib.import_module(module_name)
    try:
        cfg = load_config(getattr(module, class_name), config_path, overrides)
    except ConfigError as exc:
        print(f"c2f {command}: {exc}", file=sys.stderr)
        return 2
    from c2f_megatron.checkpoint.megatron_dir import CheckpointError
    from c2f_megatron.platform.distributed import init_distributed
    from c2f_megatron.training.run_loop import NonFiniteLossError
    from c2f_megatron.training.trainer import run

    init_distributed(cfg.parallel)
    try:  # input problems (data files, tokenizer, checkpoints, config values): one line, no traceback
        task = module.build_task(cfg)
    except (ConfigError, CheckpointError, OSError, ValueError) as exc:
        print(f"c2f {command}: {exc}", file=sys.stderr)
        return 2
    try:
        run(cfg, task, config_dump=to_dict(cfg))
    except CheckpointError as exc:
        print(f"c2f {command}: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"c2f {command}: {exc}", file=sys.stderr)
        return 3
    return 0
