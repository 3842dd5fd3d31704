"""``c2f info``: what this machine would run (device, backend, layer spec) and the model presets."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    import torch

    from c2f_megatron.models.config import PRESETS
    from c2f_megatron.models.specs import resolve_layer_spec
    from c2f_megatron.platform.distributed import use_cuda

    print(f"torch {torch.__version__}; device: {'cuda + nccl' if use_cuda() else 'cpu + gloo'}")
    print(f"layer spec for 'auto': {resolve_layer_spec('auto')}")
    for name, cfg in PRESETS.items():
        window = cfg.sliding_window if cfg.sliding_window else "-"
        print(
            f"  {name:18s} layers={cfg.num_layers:3d} hidden={cfg.hidden_size:5d} heads={cfg.num_attention_heads}"
            f"/{cfg.num_query_groups} ffn={cfg.ffn_hidden_size} vocab={cfg.vocab_size} rope={cfg.rotary_base:g}"
            f" window={window} params={cfg.num_parameters() / 1e6:.1f}M"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show presets, layer-spec choice and the platform")
    p.set_defaults(func=run)
