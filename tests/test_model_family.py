"""The Llama family beyond plain Mistral: a tied-embedding Mistral and an untied Llama (explicit head_dim,
Llama-3 RoPE scaling), random and tiny, through both converters (logits parity, bitwise round trips, tied
weights across pipeline stages) and both merge modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from c2f_megatron.merge.cli import main as merge_main
from c2f_megatron.merge.math import evaluate
from c2f_megatron.merge.recipe import MergeRecipe
from tests.launch import REPO_ROOT, run_python, run_torchrun
from tests.test_convert import (
    TO_HF,
    TO_MEGATRON,
    TOLERANCE,
    VERIFY,
    _hf_config,
    _tensors,
    _verified_diff,
    assert_bitwise_equal,
)

MERGE = REPO_ROOT / "tools" / "merge_checkpoints.py"


def _mistral_tied():
    from transformers import MistralForCausalLM

    return MistralForCausalLM, _hf_config(tie_word_embeddings=True)


def _llama_untied():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=1003,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # != hidden / heads
        rope_theta=5000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM, cfg


FAMILIES = {"mistral-tied": _mistral_tied, "llama-untied": _llama_untied}


def _random_hf(make, out: Path, seed: int) -> Path:
    cls, cfg = make()
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():  # norms too, so a swapped or dropped norm cannot go unnoticed
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(out, max_shard_size="100KB")
    return out


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Two random HF checkpoints (a, b) of each family variant."""
    root = tmp_path_factory.mktemp("family")
    return {
        name: (_random_hf(make, root / f"{name}-a", 0), _random_hf(make, root / f"{name}-b", 1))
        for name, make in FAMILIES.items()
    }


def _logits(hf_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    tokens = torch.arange(48).reshape(2, 24) * 37 % 1003
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(hf_dir).eval()(tokens).logits


def test_tied_mistral_round_trip_across_pipeline_stages(family_dirs, tmp_path):
    """The last pipeline stage holds a copy of the embedding: filled from embed_tokens, checked by --verify
    at PP2, never exported (no lm_head.weight), and a PP2 save loads at PP1 (megatron's tied replica)."""
    hf, _ = family_dirs["mistral-tied"]
    assert "lm_head.weight" not in _tensors(hf)
    mg = tmp_path / "mg"
    out = run_torchrun(TO_MEGATRON, 2, ["--hf-dir", str(hf), "--out", str(mg), "--pp", "2", *VERIFY])
    assert _verified_diff(out) <= TOLERANCE
    meta = json.loads((mg / "c2f_checkpoint.json").read_text())
    assert meta["model"]["untie_embeddings_and_output_weights"] is False
    assert meta["provenance"]["format"] == "huggingface-mistral"
    back_pp1, back_pp2 = tmp_path / "hf_pp1", tmp_path / "hf_pp2"
    run_python(TO_HF, ["--megatron-dir", str(mg), "--out", str(back_pp1)])
    run_torchrun(TO_HF, 2, ["--megatron-dir", str(mg), "--out", str(back_pp2), "--pp", "2"])
    for back in (back_pp1, back_pp2):
        assert_bitwise_equal(hf, back)
        config = json.loads((back / "config.json").read_text())
        assert config["tie_word_embeddings"] is True and config["sliding_window"] == 8
    assert torch.equal(_logits(hf), _logits(back_pp2))


def test_untied_llama_round_trip_with_head_dim_and_rope_scaling(family_dirs, tmp_path):
    """LlamaForCausalLM: explicit head_dim (q/o projections of heads * head_dim) and llama3 RoPE scaling,
    which megatron's RotaryEmbedding applies: logits match at TP1 and TP2, the export is bitwise."""
    hf, _ = family_dirs["llama-untied"]
    mg, mg_tp2, back = tmp_path / "mg", tmp_path / "mg_tp2", tmp_path / "hf"
    out = run_python(TO_MEGATRON, ["--hf-dir", str(hf), "--out", str(mg), *VERIFY])
    assert _verified_diff(out) <= TOLERANCE
    meta = json.loads((mg / "c2f_checkpoint.json").read_text())["model"]
    assert (meta["family"], meta["kv_channels"], meta["rope_scaling_factor"]) == ("llama", 24, 8.0)
    out = run_torchrun(TO_MEGATRON, 2, ["--hf-dir", str(hf), "--out", str(mg_tp2), "--tp", "2", *VERIFY])
    assert _verified_diff(out) <= TOLERANCE
    run_python(TO_HF, ["--megatron-dir", str(mg_tp2), "--out", str(back)])
    assert_bitwise_equal(hf, back)
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "sliding_window" not in config
    assert config["rope_parameters"]["rope_type"] == "llama3" and config["head_dim"] == 24
    assert torch.equal(_logits(hf), _logits(back))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merge_both_modes(family, family_dirs, tmp_path):
    """HF mode: every tensor is the fp32 formula rounded once, and transformers loads the result. Megatron
    mode (rank-parallel, PP2 output for the tied model): the same formula after loading."""
    a, b = family_dirs[family]
    merged = tmp_path / "merged"
    assert merge_main(["--a", str(a), "--b", str(b), "--gamma", "0.7", "--out", str(merged)]) == 0
    ta, tb, tm = _tensors(a), _tensors(b), _tensors(merged)
    assert sorted(tm) == sorted(ta)
    recipe = MergeRecipe("weighted", (0.7, 0.3))
    for name, value in tm.items():
        want = evaluate(recipe, [ta[name].float(), tb[name].float()]).to(value.dtype)
        assert torch.equal(value, want), name
    assert json.loads((merged / "config.json").read_text()) == json.loads((a / "config.json").read_text())
    assert torch.isfinite(_logits(merged)).all()

    mg_a, mg_b, mg_out = tmp_path / "mg_a", tmp_path / "mg_b", tmp_path / "mg_merged"
    for src, dst in ((a, mg_a), (b, mg_b)):
        run_python(TO_MEGATRON, ["--hf-dir", str(src), "--out", str(dst)])
    layout = ["--pp", "2"] if family == "mistral-tied" else ["--tp", "2"]
    args = ["--a", str(mg_a), "--b", str(mg_b), "--gamma", "0.7", "--out", str(mg_out), *layout]
    run_torchrun(MERGE, 2, args)
    out = run_python(
        "merge_verify_megatron.py",
        ["--a", str(mg_a), "--b", str(mg_b), "--base", str(mg_a), "--check", f"{mg_out}:linear:0.7"],
    )
    assert out.count("OK ") == 1, out
