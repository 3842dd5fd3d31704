"""``c2f merge`` / ``tools/merge_checkpoints.py``: the Knowledge Residue Merger's command line.

Three forms, the mode (HF safetensors or c2f megatron checkpoints) detected from the inputs::

    --a COARSE --b SFT --gamma G --out OUT                  gamma*a + (1-gamma)*b  (the Fine Actor)
    --a COARSE --b SFT --base BASE --gamma G --out OUT      b + gamma*(a - base)   (task vector)
    --model DIR:W --model DIR:W [...] --out OUT             sum_i W_i * DIR_i      (N-way, weights as given)

An input may also be a training root (``runs/coarse/checkpoints``): its newest complete step, ``actor/`` of a
PPO step. ``--gamma`` takes ``0.7``, ``0.1:0.9:0.1`` or ``0.3,0.7``; several values write ``OUT/gamma_0.70`` ... from
one pass over the inputs. Megatron mode runs under torchrun/srun (any number of ranks, a multiple of
``--tp * --pp``); each rank reads and writes only its shards. HF mode is one process that never imports
torch: a C kernel, compiled on first use into ~/.cache/c2f_megatron, merges the chunks
(``C2F_MERGE_NATIVE=0`` uses torch instead, as does a machine without a C compiler).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from c2f_megatron.checkpoint import METADATA_FILE
from c2f_megatron.merge import MergeError
from c2f_megatron.merge.gamma import GammaError, output_dirs, parse_gammas
from c2f_megatron.merge.recipe import MergeRecipe

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", type=Path, help="checkpoint weighted by gamma (the Coarse Actor)")
    p.add_argument("--b", type=Path, help="checkpoint weighted by 1 - gamma (the SFT model)")
    p.add_argument("--gamma", help="0.7 | START:STOP:STEP (inclusive) | comma list; each in [0, 1]")
    p.add_argument("--base", type=Path, help="task-vector mode: write b + gamma * (a - base)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="DIR:WEIGHT",
        help="N-way mode (repeat, at least 2): sum of WEIGHT * DIR, weights used as given (not normalised)",
    )
    p.add_argument("--out", type=Path, required=True, help="output checkpoint (or sweep directory)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="output dtype (default: the inputs' dtype)")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--tp", type=int, default=1, help="megatron mode: tensor parallel size of the merge/output"
    )
    p.add_argument(
        "--pp", type=int, default=1, help="megatron mode: pipeline parallel size of the merge/output"
    )


def build_plan(args: argparse.Namespace) -> tuple[list[Path], list[str], list[MergeRecipe], list[Path]]:
    """Inputs, their roles, one recipe per output, the output directories; refuses inconsistent flags."""
    if args.model:
        if args.a or args.b or args.base or args.gamma:
            raise MergeError("--model (N-way) cannot be combined with --a/--b/--base/--gamma")
        if len(args.model) < 2:
            raise MergeError("N-way merge needs at least two --model DIR:WEIGHT")
        paths, weights = [], []
        for item in args.model:
            path, sep, weight = item.rpartition(":")
            if not sep or not path:
                raise MergeError(f"--model {item!r}: expected DIR:WEIGHT")
            try:
                weights.append(float(weight))
            except ValueError as exc:
                raise MergeError(f"--model {item!r}: weight {weight!r} is not a number") from exc
            paths.append(Path(path))
        try:
            recipe = MergeRecipe("weighted", tuple(weights))
        except ValueError as exc:
            raise MergeError(str(exc)) from exc
        return paths, [f"model{i}" for i in range(len(paths))], [recipe], [args.out]
    missing = [f"--{n}" for n in ("a", "b", "gamma") if getattr(args, n) in (None, "")]
    if missing:
        raise MergeError(f"missing {', '.join(missing)} (or use --model DIR:WEIGHT for an N-way merge)")
    gammas = parse_gammas(args.gamma)
    if args.base is not None:
        recipes = [MergeRecipe("task", (g,)) for g in gammas]
        return [args.a, args.b, args.base], ["a", "b", "base"], recipes, output_dirs(args.out, gammas)
    recipes = [MergeRecipe("weighted", (g, 1.0 - g)) for g in gammas]
    return [args.a, args.b], ["a", "b"], recipes, output_dirs(args.out, gammas)


def resolve_input(path: Path, flag: str) -> Path:
    """An HF directory or a c2f checkpoint as given; a training root resolved to its newest complete step
    (``actor/`` inside a PPO step), as every command resolves checkpoints."""
    from c2f_megatron.checkpoint.hf_dir import is_hf_directory

    if not path.is_dir() or (path / METADATA_FILE).is_file() or is_hf_directory(path):
        return path  # HF mode stays torch-free: the resolver is imported only for a training root
    from c2f_megatron.checkpoint.resolve import resolve_checkpoint

    return resolve_checkpoint(path, role="actor", field=flag)


def detect_mode(paths: list[Path]) -> str:
    """'hf' (config.json + safetensors) or 'megatron' (c2f_checkpoint.json); all inputs must agree."""
    from c2f_megatron.checkpoint.hf_dir import is_hf_directory

    modes = []
    for p in paths:
        if not p.is_dir():
            raise MergeError(f"{p}: checkpoint directory not found")
        if (p / METADATA_FILE).is_file():
            modes.append("megatron")
        elif is_hf_directory(p):
            modes.append("hf")
        else:
            raise MergeError(
                f"{p}: neither a c2f megatron checkpoint ({METADATA_FILE}) nor an HF safetensors directory "
                "(config.json + model.safetensors or model.safetensors.index.json)"
            )
    if len(set(modes)) > 1:
        listing = ", ".join(f"{p} ({m})" for p, m in zip(paths, modes))
        raise MergeError(f"inputs mix checkpoint formats: {listing}; convert them to one format first")
    return modes[0]


def run(args: argparse.Namespace) -> int:
    try:
        inputs, roles, recipes, outs = build_plan(args)
        flags = ["--model"] * len(inputs) if args.model else [f"--{r}" for r in roles]
        inputs = [resolve_input(p, flag) for p, flag in zip(inputs, flags)]
        mode = detect_mode(inputs)
        if mode == "hf":
            if args.tp != 1 or args.pp != 1:
                raise MergeError("--tp/--pp apply to megatron checkpoints only (HF mode is single-process)")
            from c2f_megatron.merge.hf import merge_hf

            written = merge_hf(inputs, roles, recipes, outs, dtype=args.dtype, force=args.force)
        else:
            from c2f_megatron.merge.megatron import merge_megatron

            written = merge_megatron(
                inputs, roles, recipes, outs, dtype=args.dtype, force=args.force, tp=args.tp, pp=args.pp
            )
    except (MergeError, GammaError, OSError) as exc:
        _report(f"c2f merge: error: {exc}")
        return 2
    except ValueError as exc:  # CheckpointError and model-config errors from the checkpoint layer
        _report(f"c2f merge: error: {exc}")
        return 2
    for path in written:
        _report(f"wrote {path}")
    return 0


def _report(message: str) -> None:
    """Print once per job (rank 0 under torchrun/srun)."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if rank == "0":
        print(message, file=sys.stderr if "error" in message else sys.stdout)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="Knowledge Residue Merger: gamma-weighted checkpoint merge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="merge_checkpoints.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
