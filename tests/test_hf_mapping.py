"""Layout and config facts of the HF <-> megatron mapping, checked against slow reference implementations."""

from __future__ import annotations

import pytest
import torch

from c2f_megatron.checkpoint import hf_mapping as hm
from c2f_megatron.models.config import ModelConfig

HEADS, GROUPS, D, HIDDEN = 8, 2, 3, 5


def _reference_qkv(q, k, v, heads, groups):
    """Row by row: for each group, its query heads, then its key head, then its value head."""
    d = q.shape[0] // heads
    rows = []
    for g in range(groups):
        for h in range(g * heads // groups, (g + 1) * heads // groups):
            rows += [q[h * d + i] for i in range(d)]
        rows += [k[g * d + i] for i in range(d)]
        rows += [v[g * d + i] for i in range(d)]
    return torch.stack(rows)


def _qkv_inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(HEADS * D, HIDDEN, generator=gen)
    k = torch.randn(GROUPS * D, HIDDEN, generator=gen)
    v = torch.randn(GROUPS * D, HIDDEN, generator=gen)
    return q, k, v


def test_qkv_interleave_matches_reference_and_inverts():
    q, k, v = _qkv_inputs()
    fused = hm.qkv_to_megatron(q, k, v, HEADS, GROUPS)
    assert torch.equal(fused, _reference_qkv(q, k, v, HEADS, GROUPS))
    q2, k2, v2 = hm.qkv_from_megatron(fused, HEADS, GROUPS)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_qkv_mha_case_is_per_head_interleave():
    q, k, v = (torch.arange(4 * 2, dtype=torch.float32).reshape(4, 2) + 100 * i for i in range(3))
    fused = hm.qkv_to_megatron(q, k, v, num_heads=2, num_groups=2)  # d = 2
    assert fused[:, 0].tolist() == [0, 2, 100, 102, 200, 202, 4, 6, 104, 106, 204, 206]


@pytest.mark.parametrize("tp", [1, 2])
def test_qkv_tp_shards_concatenate_to_global(tp):
    q, k, v = _qkv_inputs()
    shards = []
    for rank in range(tp):
        qs = q[slice(*hm.tp_range(HEADS * D, tp, rank))]
        ks = k[slice(*hm.tp_range(GROUPS * D, tp, rank))]
        vs = v[slice(*hm.tp_range(GROUPS * D, tp, rank))]
        shards.append(hm.qkv_to_megatron(qs, ks, vs, HEADS // tp, GROUPS // tp))
    assert torch.equal(torch.cat(shards), hm.qkv_to_megatron(q, k, v, HEADS, GROUPS))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fc1_rank_layout_and_global_merge(tp):
    f = 8
    gate = torch.arange(f * 2, dtype=torch.float32).reshape(f, 2)
    up = -gate - 1
    shards = []
    for rank in range(tp):
        rows = slice(*hm.tp_range(f, tp, rank))
        local = hm.fc1_to_megatron(gate[rows], up[rows])
        per = f // tp
        # reference: the rank holds its gate rows, then its up rows
        assert torch.equal(local[:per], gate[rank * per : (rank + 1) * per])
        assert torch.equal(local[per:], up[rank * per : (rank + 1) * per])
        shards.append(local)
    g2, u2 = hm.fc1_from_tp_shards(shards)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    g1, u1 = hm.fc1_from_megatron(hm.fc1_to_megatron(gate, up))
    assert torch.equal(g1, gate) and torch.equal(u1, up)


def test_vocab_pad_trim_and_rank_rows():
    w = torch.randn(1003, 4)
    cfg = ModelConfig(vocab_size=1003, hidden_size=8, num_attention_heads=2, num_query_groups=2)
    padded = cfg.padded_vocab_size(2)
    assert padded == 1024
    full = hm.pad_vocab(w, padded)
    assert torch.equal(full[:1003], w) and torch.count_nonzero(full[1003:]) == 0
    assert torch.equal(hm.trim_vocab(full, 1003), w)
    for tp in (1, 2, 4):
        pieces = []
        for rank in range(tp):
            start, real, zeros = hm.vocab_rows_for_rank(1003, cfg.padded_vocab_size(tp), tp, rank)
            pieces.append(torch.cat([w[start : start + real], w.new_zeros(zeros, 4)]))
        assert torch.equal(torch.cat(pieces), hm.pad_vocab(w, cfg.padded_vocab_size(tp)))
    with pytest.raises(ValueError):
        hm.pad_vocab(w, 1000)
    with pytest.raises(ValueError):
        hm.trim_vocab(w, 2000)


def test_tp_range_refuses_uneven_split():
    assert hm.tp_range(12, 3, 2) == (8, 12)
    with pytest.raises(ValueError, match="does not divide"):
        hm.tp_range(10, 4, 0)


LOCAL_NAMES = [
    "embedding.word_embeddings.weight",
    "decoder.layers.1.input_layernorm.weight",
    "decoder.layers.1.self_attention.linear_qkv.weight",
    "decoder.layers.1.self_attention.linear_proj.weight",
    "decoder.layers.1.pre_mlp_layernorm.weight",
    "decoder.layers.1.mlp.linear_fc1.weight",
    "decoder.layers.1.mlp.linear_fc2.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
]
HF_FOR_LOCAL = [
    ["model.embed_tokens.weight"],
    ["model.layers.1.input_layernorm.weight"],
    [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ],
    ["model.layers.1.self_attn.o_proj.weight"],
    ["model.layers.1.post_attention_layernorm.weight"],
    ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"],
    ["model.layers.1.mlp.down_proj.weight"],
    ["model.norm.weight"],
    ["lm_head.weight"],
]


def test_local_and_te_name_maps():
    te_names = [
        n.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight").replace(
            "pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"
        )
        for n in LOCAL_NAMES
    ]
    assert hm.detect_layer_spec(LOCAL_NAMES) == "local"
    assert hm.detect_layer_spec(te_names) == "te"
    for spec, names in (("local", LOCAL_NAMES), ("sdpa", LOCAL_NAMES), ("te", te_names)):
        for name, hf in zip(names, HF_FOR_LOCAL):
            rule, local = hm.rule_for(name, spec)
            assert hm.hf_names_of(rule, local) == hf, (spec, name)
    # a tied model's last pipeline stage fills its copy of the embedding from embed_tokens
    rule, _ = hm.rule_for("output_layer.weight", "local", tied=True)
    assert rule is hm.TIED_HEAD and hm.hf_names_of(rule, None) == ["model.embed_tokens.weight"]
    with pytest.raises(KeyError, match="input_layernorm"):
        hm.rule_for("decoder.layers.0.input_layernorm.weight", "te")
    with pytest.raises(KeyError, match="value_head"):
        hm.rule_for("value_head.weight", "local")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_every_hf_tensor_has_exactly_one_rule(tied):
    cfg = ModelConfig(
        num_layers=2,
        vocab_size=100,
        hidden_size=8,
        num_attention_heads=2,
        num_query_groups=1,
        ffn_hidden_size=12,
        untie_embeddings_and_output_weights=not tied,
    )
    covered = []
    # the tied head reads the embedding again (a copy on the last stage): count each HF tensor once
    for rule in hm.model_rules(tied):
        if rule is not hm.TIED_HEAD:
            covered += hm.hf_names_of(rule, None)
    for layer in range(cfg.num_layers):
        for rule in hm.layer_rules("local"):
            covered += hm.hf_names_of(rule, layer)
    assert sorted(covered) == sorted(hm.expected_hf_shapes(cfg))
    assert ("lm_head.weight" in hm.expected_hf_shapes(cfg)) is not tied


def test_explicit_head_dim_shapes_and_parameter_count():
    """head_dim != hidden / heads (as in Qwen3/Gemma-style configs): q/o shapes follow heads * head_dim."""
    cfg = ModelConfig(
        num_layers=1, vocab_size=10, hidden_size=8, num_attention_heads=2, num_query_groups=1, kv_channels=6
    )
    shapes = hm.expected_hf_shapes(cfg)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (12, 8)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (6, 8)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (8, 12)
    assert cfg.num_parameters() == sum(torch.Size(s).numel() for s in shapes.values())


def _hf_config(**overrides):
    cfg = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": 1003,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 5000.0,
        "sliding_window": 8,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    cfg.update(overrides)
    return cfg


def test_config_translation_both_ways():
    cfg = hm.model_config_from_hf(_hf_config(), "config.json")
    assert (cfg.num_query_groups, cfg.rotary_base, cfg.sliding_window, cfg.window_size) == (
        2,
        5000.0,
        8,
        (7, 0),
    )
    assert cfg.params_dtype == "bf16" and cfg.norm_epsilon == 1e-5 and cfg.ffn_hidden_size == 96
    assert hm.model_config_from_hf(_hf_config(), "c", "fp32").params_dtype == "fp32"
    back = hm.model_config_from_hf(hm.hf_config_from_model(cfg, "bf16"), "config.json")
    assert back == cfg
    # transformers 5 writes rope_parameters instead of rope_theta
    v5 = _hf_config(rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    del v5["rope_theta"]
    assert hm.model_config_from_hf(v5, "c").rotary_base == 1e6
    assert hm.model_config_from_hf(_hf_config(sliding_window=None), "c").window_size is None


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"architectures": ["MixtralForCausalLM"]}, "architectures"),
        ({"architectures": ["LlamaForCausalLM"]}, "model_type"),
        ({"model_type": "mixtral"}, "model_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ({"head_dim": 0}, "head_dim"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"pretraining_tp": 2}, "pretraining_tp"),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 2.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
            },
            "rope_scaling",
        ),
        ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}}, "rope_parameters"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_config_refusals_name_the_field(overrides, field):
    """What megatron's GPTModel cannot express is refused in one line naming the config field."""
    with pytest.raises(hm.ConversionError, match=rf"my/config.json: field '{field}'"):
        hm.model_config_from_hf(_hf_config(**overrides), "my/config.json")


def _llama_config(**overrides):
    cfg = _hf_config(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True)
    del cfg["sliding_window"]
    cfg.update(overrides)
    return cfg


def test_llama_family_config_both_ways():
    """SmolLM2-style Llama: tied embeddings, another rope theta, explicit head_dim; Llama-3.1 rope scaling."""
    cfg = hm.model_config_from_hf(_llama_config(head_dim=32, rope_theta=1e5), "config.json")
    assert cfg.family == "llama" and cfg.tied_embeddings and cfg.kv_channels == 32 and cfg.head_dim == 32
    assert cfg.rotary_base == 1e5 and cfg.sliding_window is None and cfg.rope_scaling_factor is None
    out = hm.hf_config_from_model(cfg, "bf16", {"bos_id": 1, "eos_id": 2, "pad_id": 2})
    assert out["architectures"] == ["LlamaForCausalLM"] and out["tie_word_embeddings"] is True
    assert "sliding_window" not in out and out["pad_token_id"] == 2
    assert hm.model_config_from_hf(out, "config.json") == cfg
    # head_dim equal to hidden / heads is not recorded as explicit
    assert hm.model_config_from_hf(_llama_config(), "c").kv_channels is None
    scaled = _llama_config(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    )
    cfg = hm.model_config_from_hf(scaled, "c")
    assert cfg.rope_scaling_factor == 32.0
    assert hm.model_config_from_hf(hm.hf_config_from_model(cfg, "bf16"), "c") == cfg
    # the HF classes' own defaults: Llama ties unless told otherwise, Mistral does not
    no_tie = _llama_config()
    del no_tie["tie_word_embeddings"]
    assert hm.model_config_from_hf(no_tie, "c").tied_embeddings
    mistral = _hf_config()
    del mistral["tie_word_embeddings"]
    assert not hm.model_config_from_hf(mistral, "c").tied_embeddings
    with pytest.raises(hm.ConversionError, match="field 'sliding_window' is set"):
        hm.model_config_from_hf(_llama_config(sliding_window=8), "c")
