"""Layer specs against each other and against a direct, slow Mistral forward written from the weights.

Prints one JSON line of max-abs logit differences: sdpa vs local (causal), local and sdpa vs the direct
reference with a sliding window shorter than the sequence, and sdpa vs local with a left-padding mask.
"""

from __future__ import annotations

import json
import math

import torch

from c2f_megatron.models import ModelConfig, build_gpt_model, position_ids_for
from c2f_megatron.platform import ParallelConfig, init_distributed


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE on [b, h, s, d] (HF Mistral / megatron non-interleaved convention)."""
    d, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(sd: dict[str, torch.Tensor], cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """A plain loop over layers; attention with explicit per-position loops over the window."""
    b, s = tokens.shape
    nh, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    x = sd["embedding.word_embeddings.weight"][tokens]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        h = rms_norm(x, sd[p + "self_attention.linear_qkv.layer_norm_weight"], cfg.norm_epsilon)
        qkv = h @ sd[p + "self_attention.linear_qkv.weight"].T  # [b, s, ng*(nh/ng+2)*d]
        qkv = qkv.view(b, s, ng, nh // ng + 2, d)
        q = qkv[:, :, :, : nh // ng].reshape(b, s, nh, d).transpose(1, 2)
        k = qkv[:, :, :, nh // ng].transpose(1, 2)
        v = qkv[:, :, :, nh // ng + 1].transpose(1, 2)
        q, k = rope(q, cfg.rotary_base), rope(k, cfg.rotary_base)
        out = torch.zeros(b, nh, s, d)
        for head in range(nh):
            g = head // (nh // ng)
            for t in range(s):
                lo = 0 if cfg.sliding_window is None else max(0, t - cfg.sliding_window + 1)
                scores = (q[:, head, t : t + 1] @ k[:, g, lo : t + 1].transpose(-1, -2)) / math.sqrt(d)
                out[:, head, t] = (scores.softmax(-1) @ v[:, g, lo : t + 1]).squeeze(1)
        x = x + out.transpose(1, 2).reshape(b, s, nh * d) @ sd[p + "self_attention.linear_proj.weight"].T
        h = rms_norm(x, sd[p + "mlp.linear_fc1.layer_norm_weight"], cfg.norm_epsilon)
        gate, up = (h @ sd[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.linear_fc2.weight"].T
    x = rms_norm(x, sd["decoder.final_layernorm.weight"], cfg.norm_epsilon)
    return (x @ sd["output_layer.weight"].T)[..., : cfg.vocab_size]


def te_style_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Local-spec norm names -> the fused names the reference reads (input_layernorm -> linear_qkv...)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        k = k.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        out[k] = v
    return out


def main() -> None:
    init_distributed(ParallelConfig(seed=11))
    torch.set_grad_enabled(False)
    base = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        vocab_size=300,
        max_position_embeddings=64,
    )
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 300, (2, 20), generator=gen)
    pos = position_ids_for(tokens)
    result: dict[str, float] = {}

    def pair(**kw):
        local = build_gpt_model(ModelConfig(layer_spec="local", **base, **kw)).eval()
        sdpa = build_gpt_model(ModelConfig(layer_spec="sdpa", **base, **kw)).eval()
        sdpa.load_state_dict(local.state_dict())
        return local, sdpa

    local, sdpa = pair()
    result["sdpa_vs_local_causal"] = (local(tokens, pos, None) - sdpa(tokens, pos, None)).abs().max().item()

    cfg_w = ModelConfig(layer_spec="local", sliding_window=5, **base)
    local_w, sdpa_w = pair(sliding_window=5)
    sd = te_style_names({k: v for k, v in local_w.state_dict().items() if "_extra_state" not in k})
    ref = reference_logits(sd, cfg_w, tokens)
    result["local_window_vs_reference"] = (local_w(tokens, pos, None)[..., :300] - ref).abs().max().item()
    result["sdpa_window_vs_reference"] = (sdpa_w(tokens, pos, None)[..., :300] - ref).abs().max().item()
    # Off-by-one guard: the same weights with window W+1 must differ from the W reference.
    local_w1 = build_gpt_model(ModelConfig(layer_spec="local", sliding_window=6, **base)).eval()
    local_w1.load_state_dict(local_w.state_dict())
    result["window_plus_one_vs_reference"] = (local_w1(tokens, pos, None)[..., :300] - ref).abs().max().item()

    # Left padding: 3 pad positions on row 0; compare the real positions of both specs.
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[0, :3] = True
    causal = torch.triu(torch.ones(20, 20, dtype=torch.bool), diagonal=1)
    mask = (causal[None] | pad[:, None, :])[:, None]  # [b, 1, s, s], True = masked
    out_l, out_s = local(tokens, pos, mask), sdpa(tokens, pos, mask)
    result["sdpa_vs_local_left_padding"] = (out_l[0, 3:] - out_s[0, 3:]).abs().max().item()
    result["sdpa_left_padding_finite"] = float(torch.isfinite(out_s).all().item())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
