"""Bytes one transformer layer keeps for its backward pass: measured with a saved-tensors hook (unique
storages, parameters excluded) and as ``plan.memory.layer_activations`` predicts them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from c2f_megatron.models.config import get_preset
from c2f_megatron.models.gpt import build_gpt_model
from c2f_megatron.plan import memory
from c2f_megatron.platform import ParallelConfig, init_distributed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    recompute = None if args.recompute == "none" else args.recompute
    init_distributed(ParallelConfig(seed=0))
    cfg = get_preset(
        "mistral-nano", params_dtype="fp32", layer_spec="sdpa", num_layers=1, hidden_size=128,
        num_attention_heads=8, num_query_groups=2, ffn_hidden_size=352,
    )  # fmt: skip
    overrides = {} if recompute is None else {"recompute_granularity": recompute}
    if recompute == "full":
        overrides.update(recompute_method="uniform", recompute_num_layers=1)
    model = build_gpt_model(cfg, **overrides).train()
    layer = model.decoder.layers[0]
    s, b = 64, 2
    x = torch.randn(s, b, cfg.hidden_size, requires_grad=True)
    rope = model.rotary_pos_emb(s)
    # parameters, and the RoPE frequencies every layer shares (one tensor per micro-batch, not per layer)
    params = {q.untyped_storage().data_ptr() for q in [*model.parameters(), rope]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if recompute == "full":  # the block's checkpoint around the layer, as megatron's full recompute
            out = model.decoder._checkpointed_forward(x, None, None, None, rope, None, None, False)
        else:
            out, _ = layer(x, attention_mask=None, rotary_pos_emb=rope)
    out.sum().backward()  # the saved tensors were usable
    shape = memory.LayerShape(
        hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim, ffn=cfg.ffn_hidden_size,
    )  # fmt: skip
    predicted = sum(memory.layer_activations(shape, s, b, 1, False, recompute, 4).values())
    Path(args.out).write_text(json.dumps({"measured": sum(saved.values()), "predicted": predicted}))


if __name__ == "__main__":
    main()
