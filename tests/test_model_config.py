"""Mistral presets, the HF->megatron sliding-window translation, vocab padding and TransformerConfig."""

from __future__ import annotations

import pytest
import torch

from c2f_megatron.models.config import PRESETS, ModelConfig, get_preset, to_transformer_config


def test_mistral_7b_v01_matches_hf_config():
    cfg = PRESETS["mistral-7b-v0.1"]
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (
        32,
        4096,
        32,
        8,
    )
    assert (cfg.ffn_hidden_size, cfg.vocab_size, cfg.norm_epsilon, cfg.rotary_base) == (
        14336,
        32000,
        1e-5,
        1e4,
    )
    assert cfg.sliding_window == 4096 and cfg.window_size == (4095, 0)
    assert cfg.untie_embeddings_and_output_weights
    # 7,241,732,096 parameters: the published size of Mistral-7B-v0.1
    assert cfg.num_parameters() == 7_241_732_096


def test_v02_v03_presets():
    v2, v3 = PRESETS["mistral-7b-v0.2"], PRESETS["mistral-7b-v0.3"]
    assert v2.rotary_base == v3.rotary_base == 1e6
    assert v2.sliding_window is None and v3.sliding_window is None and v2.window_size is None
    assert (v2.vocab_size, v3.vocab_size) == (32000, 32768)


def test_llama_family_presets():
    """Published sizes: SmolLM2-135M 134.5M (tied, 9 heads / 3 groups), Llama-3-8B 8.03B (untied)."""
    smol, llama3, llama31 = PRESETS["smollm2-135m"], PRESETS["llama-3-8b"], PRESETS["llama-3.1-8b"]
    assert smol.family == llama3.family == "llama" and smol.tied_embeddings and not llama3.tied_embeddings
    assert (smol.num_attention_heads, smol.num_query_groups, smol.head_dim, smol.rotary_base) == (
        9,
        3,
        64,
        1e5,
    )
    assert smol.num_parameters() == 134_515_008
    assert llama3.num_parameters() == llama31.num_parameters() == 8_030_261_248
    assert llama3.rope_scaling_factor is None and llama31.rope_scaling_factor == 8.0
    with pytest.raises(ValueError, match="sliding_window must be null for family 'llama'"):
        get_preset("smollm2-135m", sliding_window=4)


def test_transformer_config_translation():
    cfg = get_preset("mistral-nano", sliding_window=8, params_dtype="bf16")
    tc = to_transformer_config(cfg, tensor_model_parallel_size=2)
    assert tc.window_size == (7, 0)
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and not tc.add_bias_linear
    assert tc.num_query_groups == 2 and tc.kv_channels == 16
    assert tc.bf16 and tc.params_dtype == torch.bfloat16
    assert tc.activation_func is torch.nn.functional.silu


def test_padded_vocab():
    cfg = ModelConfig(vocab_size=1003)
    assert cfg.padded_vocab_size(1) == 1024
    assert cfg.padded_vocab_size(2) == 1024
    assert cfg.padded_vocab_size(4) == 1024
    assert cfg.padded_vocab_size(8) == 1024 * 1
    assert ModelConfig(vocab_size=32000).padded_vocab_size(8) == 32768
    assert ModelConfig(vocab_size=32768).padded_vocab_size(1) == 32768


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_attention_heads": 6, "num_query_groups": 4}, "not divisible by num_query_groups"),
        ({"hidden_size": 100, "num_attention_heads": 8}, "hidden_size 100 not divisible"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"params_dtype": "fp8"}, "params_dtype"),
        ({"layer_spec": "flash"}, "layer_spec"),
    ],
)
def test_invalid_model_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_parallel_layout_refusals():
    cfg = get_preset("mistral-nano")  # 2 layers, 4 heads, 2 groups
    with pytest.raises(ValueError, match="does not divide num_layers"):
        to_transformer_config(cfg, pipeline_model_parallel_size=3)
    with pytest.raises(ValueError, match="does not divide num_query_groups"):
        to_transformer_config(cfg, tensor_model_parallel_size=4)


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("mistral-70b")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        get_preset("mistral-nano", hidden=5)
