"""``c2f convert hf-to-megatron | megatron-to-hf | gguf-to-hf``: the converters' command line (also
``tools/convert_*.py``).

The megatron converters run as one process (TP1 PP1) or under ``torchrun`` with ``--tp``/``--pp`` (each rank
converts its shard); ``gguf-to-hf`` (llama.cpp GGUF -> HF Llama directory) is a single process.
Refused inputs end with one clear line on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from c2f_megatron.models.config import DTYPE_NAMES


def add_hf_to_megatron_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-dir", required=True, help="HF Mistral directory: config.json + safetensors")
    p.add_argument("--out", required=True, help="output c2f megatron checkpoint directory")
    p.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), default=None, help="parameter dtype (default: the HF one)"
    )
    p.add_argument(
        "--verify", action="store_true", help="compare HF and megatron logits; fail above tolerance"
    )
    p.add_argument("--verify-seq-len", type=int, default=32, help="length of the fixed verify sequence")
    p.add_argument(
        "--verify-tolerance", type=float, default=None, help="max |logit diff| (default 1e-4 in fp32)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    _layout_args(p)


def add_megatron_to_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--megatron-dir",
        required=True,
        help="c2f megatron checkpoint directory, or a training root (its newest step; actor/ of a PPO step)",
    )
    p.add_argument("--out", required=True, help="output HF directory (safetensors shards + index + config)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), default=None, help="output dtype (default: the checkpoint's)"
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    _layout_args(p)


def add_gguf_to_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gguf", required=True, help="llama.cpp GGUF file of a Llama-architecture model")
    p.add_argument("--out", required=True, help="output HF directory (safetensors + config + tokenizer)")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPE_NAMES),
        default="fp32",
        help="output dtype (default fp32: exact dequantization)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size while converting (under torchrun)")
    p.add_argument(
        "--pp", type=int, default=1, help="pipeline parallel size while converting (under torchrun)"
    )


def run_hf_to_megatron(args: argparse.Namespace) -> int:
    from c2f_megatron.checkpoint.convert import convert_hf_to_megatron

    return _guarded(
        lambda: convert_hf_to_megatron(
            args.hf_dir,
            args.out,
            dtype=args.dtype,
            force=args.force,
            verify=args.verify,
            tp=args.tp,
            pp=args.pp,
            verify_seq_len=args.verify_seq_len,
            verify_tolerance=args.verify_tolerance,
        )
    )


def run_megatron_to_hf(args: argparse.Namespace) -> int:
    from c2f_megatron.checkpoint.convert import convert_megatron_to_hf
    from c2f_megatron.checkpoint.resolve import resolve_checkpoint

    return _guarded(
        lambda: convert_megatron_to_hf(
            resolve_checkpoint(args.megatron_dir, role="actor", field="--megatron-dir"),
            args.out,
            dtype=args.dtype,
            force=args.force,
            tp=args.tp,
            pp=args.pp,
            max_shard_size=args.max_shard_size,
        )
    )


def run_gguf_to_hf(args: argparse.Namespace) -> int:
    from c2f_megatron.checkpoint.gguf import convert_gguf_to_hf

    return _guarded(
        lambda: convert_gguf_to_hf(
            args.gguf, args.out, dtype=args.dtype, force=args.force, max_shard_size=args.max_shard_size
        )
    )


def _guarded(convert) -> int:
    from c2f_megatron.checkpoint.megatron_dir import CheckpointError, rank_and_world

    try:
        report = convert()
    except (CheckpointError, OSError) as exc:
        print(f"c2f convert: error: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        if rank_and_world()[1] > 1:
            # the other ranks wait in a collective this rank will never join: exit now so torchrun stops them
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        raise
    if rank_and_world()[0] == 0:
        verified = (
            ""
            if report.max_logit_diff is None
            else (
                f"; verify: max |logit diff| {report.max_logit_diff:.3e} (tolerance {report.tolerance:.1e})"
            )
        )
        print(f"wrote {report.out} in {report.seconds:.1f} s{verified}", flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between HF and Megatron")
    conv = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    a = conv.add_parser("hf-to-megatron", help="HF Mistral (safetensors) -> c2f megatron checkpoint")
    add_hf_to_megatron_args(a)
    a.set_defaults(func=run_hf_to_megatron)
    b = conv.add_parser("megatron-to-hf", help="c2f megatron checkpoint -> HF Mistral (safetensors)")
    add_megatron_to_hf_args(b)
    b.set_defaults(func=run_megatron_to_hf)
    c = conv.add_parser("gguf-to-hf", help="llama.cpp GGUF (Llama architecture) -> HF Llama (safetensors)")
    add_gguf_to_hf_args(c)
    c.set_defaults(func=run_gguf_to_hf)
