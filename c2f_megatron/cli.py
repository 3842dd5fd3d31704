"""The ``c2f`` command. Each subcommand lives next to the code it drives and registers itself here.

A subcommand module exposes ``register(subparsers)``, which adds its parser(s) with ``set_defaults(func=...)``;
modules are imported only when the command line names one of their commands, so ``c2f --help`` stays fast
and a heavy import (megatron, transformers) is paid only by the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module that registers it, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("c2f_megatron.info_cli", "show presets, layer-spec choice and the platform"),
    "convert": ("c2f_megatron.checkpoint.convert_cli", "convert checkpoints between HF and Megatron"),
    "checkpoint": ("c2f_megatron.checkpoint.check_cli", "verify checkpoints against their manifests"),
    "merge": ("c2f_megatron.merge.cli", "Knowledge Residue Merger: gamma-weighted checkpoint merge"),
    "train-lm": ("c2f_megatron.training.cli", "train a language model (next-token loss)"),
    "train-sft": ("c2f_megatron.training.cli", "supervised fine-tuning (loss on responses)"),
    "train-rm": ("c2f_megatron.training.cli", "train a reward model on preference pairs"),
    "coarse-actor": (
        "c2f_megatron.rl.cli",
        "Coarse Actor: PPO with the Continuous Maximization length limit",
    ),
    "eval": ("c2f_megatron.eval.cli", "evaluate a checkpoint: response metrics, benchmarks, MT-Bench"),
    "pipeline": ("c2f_megatron.pipeline", "the whole C2F recipe end to end, resumable stage by stage"),
    "plan": ("c2f_megatron.plan.cli", "per-GPU memory of every role of a job, before it runs"),
    "serve": ("c2f_megatron.serve.cli", "serve a checkpoint over the OpenAI API"),
}


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="c2f", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if selected is not None:
        importlib.import_module(SUBCOMMANDS[selected][0]).register(sub)
    for name, (_module, help_text) in SUBCOMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected is not None and selected not in SUBCOMMANDS:
        print(f"c2f: unknown command {selected!r}; commands: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if selected is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
