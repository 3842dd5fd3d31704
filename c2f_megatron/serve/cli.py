"""``c2f serve --checkpoint DIR [--port P] [--host 127.0.0.1] [--api-key KEY]``: the OpenAI API over a model.

Serves a c2f checkpoint (a step, a training root, PPO's ``actor/``), a Hugging Face directory or a GGUF file
(``smollm2-135m-instruct``: the packaged one; converted once under ``--work-dir``) at ``http://HOST:PORT/v1``: ``/v1/models``, ``/v1/chat/completions`` (rendered in
the model's chat format), ``/v1/completions``. Loopback only unless ``--host`` says otherwise; with an API key
(``--api-key`` or ``$C2F_SERVE_API_KEY``) every request must carry it as a bearer token.

Parallel: ``torchrun --nproc_per_node=TP*PP -m c2f_megatron.cli serve --checkpoint DIR
--tensor-parallel-size TP --pipeline-parallel-size PP``; rank 0 serves HTTP, every rank runs the model.
Exit codes: 0 after SIGTERM/SIGINT (the running batch finishes first), 2 bad arguments or checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from c2f_megatron.checkpoint.resolve import PACKAGED_SMOLLM2

API_KEY_ENV = "C2F_SERVE_API_KEY"
PROMPT_FORMATS = ("auto", "chat-template", "mistral-instruct", "hh")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over the OpenAI API (chat and text completions, streaming)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help=f"c2f checkpoint, training root, HF directory, GGUF file, or {PACKAGED_SMOLLM2} (the packaged GGUF)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--api-key", help=f"require this bearer token (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint's name)")
    p.add_argument("--tokenizer", help="tokenizer spec (default: the HF directory, else the checkpoint's)")
    p.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        default="auto",
        help="chat rendering (auto: the tokenizer's chat template, else mistral-instruct)",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=16, help="rows (choices) per generation batch")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="wait for concurrent requests")
    p.add_argument("--default-max-tokens", type=int, default=512, help="when a request sets none")
    p.add_argument("--layer-spec", choices=("sdpa", "local"), default="sdpa")
    p.add_argument("--work-dir", default="runs/serve", help="where an HF directory is converted")
    p.add_argument("--quiet", action="store_true", help="no line per batch")
    p.set_defaults(func=_run_args)


def _is_gguf(spec: str) -> bool:
    return spec == PACKAGED_SMOLLM2 or spec.endswith(".gguf")


def _fail(message: str) -> int:
    print(f"c2f serve: {message}", file=sys.stderr)
    return 2


def _tokenizer_spec(args: argparse.Namespace, source: Path, ckpt: Path) -> str | None:
    from c2f_megatron.checkpoint.hf_dir import is_hf_directory
    from c2f_megatron.checkpoint.megatron_dir import read_metadata

    if args.tokenizer:
        return args.tokenizer
    if source.is_dir() and is_hf_directory(source):
        return str(source)
    recorded = (read_metadata(ckpt).tokenizer or {}).get("name")
    return recorded


def _chat_format(fmt: str, tokenizer: Any) -> Any:
    from c2f_megatron.data import ChatFormat

    if fmt == "auto":
        fmt = "chat-template" if tokenizer.chat_template is not None else "mistral-instruct"
    return ChatFormat(fmt, tokenizer)


def _run_args(args: argparse.Namespace) -> int:
    for name in ("max_batch_size", "default_max_tokens", "tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        return _fail(f"--port must be in [0, 65535], got {args.port}")
    source = Path(args.checkpoint)
    if not source.exists() and args.checkpoint != PACKAGED_SMOLLM2:
        return _fail(f"--checkpoint {source}: not found")

    from c2f_megatron.checkpoint.hf_dir import is_hf_directory
    from c2f_megatron.checkpoint.megatron_dir import CheckpointError
    from c2f_megatron.checkpoint.resolve import checkpoint_or_converted, resolve_checkpoint

    if not (source.is_dir() and is_hf_directory(source)) and not _is_gguf(args.checkpoint):
        try:  # refused before torch and megatron are imported
            resolve_checkpoint(source, "actor", "--checkpoint")
        except CheckpointError as exc:
            return _fail(str(exc))
    from c2f_megatron.data import load_tokenizer
    from c2f_megatron.eval.megatron_model import MegatronLM
    from c2f_megatron.platform.distributed import ParallelConfig, init_distributed, is_rank_zero
    from c2f_megatron.serve.engine import broadcast_batch, follow_rank_zero

    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp:
        return _fail(
            f"{world} processes for TP{tp} x PP{pp}: serve runs one model replica, launch TP*PP = {tp * pp} "
            "(--nproc_per_node) and set --tensor-parallel-size / --pipeline-parallel-size"
        )
    init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    try:
        ckpt = checkpoint_or_converted(source, "actor", Path(args.work_dir) / "converted", tp, pp)
        spec = _tokenizer_spec(args, source, ckpt)
        try:
            tokenizer = load_tokenizer(spec)
        except (ValueError, OSError) as exc:
            raise CheckpointError(
                f"{ckpt}: tokenizer {spec!r} cannot be loaded ({exc}); pass --tokenizer"
            ) from exc
        lm = MegatronLM.from_checkpoint(ckpt, tokenizer, layer_spec=args.layer_spec)
        chat = _chat_format(args.prompt_format, tokenizer)
    except (CheckpointError, ValueError, OSError) as exc:
        return _fail(str(exc))
    if not is_rank_zero():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 decides when every rank stops
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        follow_rank_zero(lm)
        return 0

    from c2f_megatron.serve.server import Server

    try:
        server = Server(
            lm,
            chat,
            args.model_name or source.resolve().name,
            host=args.host,
            port=args.port,
            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
            max_batch_size=args.max_batch_size,
            batch_wait_s=args.batch_wait_ms / 1000,
            default_max_tokens=args.default_max_tokens,
            log=not args.quiet,
        )
    except OSError as exc:
        broadcast_batch(None)
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    print(
        f"c2f serve: {server.model_name} at {server.url} (TP{tp} PP{pp}, {lm.max_length} positions, "
        f"batches of up to {args.max_batch_size}, chat format {chat.fmt.value}"
        f"{', API key required' if server.api_key else ''}, pid {os.getpid()})",
        flush=True,
    )
    try:
        server.run(broadcast=broadcast_batch)
    finally:
        broadcast_batch(None)
    print("c2f serve: stopped", flush=True)
    return 0
