"""HF Mistral <-> megatron conversion on tiny random models: logits parity, bitwise round trips, refusals.

The model has GQA (4 heads / 2 groups), a vocab not divisible by 128 (1003) and a sliding window (8) shorter
than the verify sequence (24). Conversions run in fresh processes (torchrun for TP/PP); refusals must happen
before any process group starts, so they are called in-process.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from c2f_megatron.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
from c2f_megatron.checkpoint.hf_mapping import ConversionError
from tests.launch import REPO_ROOT, run_python, run_torchrun, worker_env

TO_MEGATRON = REPO_ROOT / "tools" / "convert_hf_to_megatron.py"
TO_HF = REPO_ROOT / "tools" / "convert_megatron_to_hf.py"
TOLERANCE = 1e-4
VERIFY = ["--verify", "--verify-seq-len", "24", "--verify-tolerance", str(TOLERANCE)]


def _hf_config(tie_word_embeddings: bool = False):
    from transformers import MistralConfig

    cfg = MistralConfig(
        vocab_size=1003,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    cfg.architectures = ["MistralForCausalLM"]
    return cfg


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random tiny Mistral saved by transformers as sharded safetensors, with a tokenizer file."""
    from transformers import MistralForCausalLM

    from c2f_megatron.data.tokenizer import mistral_v01_model_path

    torch.manual_seed(0)
    model = MistralForCausalLM(_hf_config())
    with torch.no_grad():  # norms too, so a swapped or dropped norm cannot go unnoticed
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("hf") / "tiny-mistral"
    model.save_pretrained(out, max_shard_size="100KB")
    shutil.copy(mistral_v01_model_path(), out / "tokenizer.model")
    assert (out / "model.safetensors.index.json").is_file()
    return out


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


def assert_bitwise_equal(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert torch.equal(ta[name].view(torch.uint8), tb[name].view(torch.uint8)), f"{name} differs"


def _verified_diff(stdout: str) -> float:
    match = re.search(r"max \|logit diff\| ([0-9.e+-]+)", stdout)
    assert match, stdout
    return float(match.group(1))


def test_tp1_parity_export_bitwise_and_loadable_by_transformers(hf_dir, tmp_path):
    from transformers import MistralForCausalLM

    mg, back = tmp_path / "mg", tmp_path / "hf"
    out = run_python(TO_MEGATRON, ["--hf-dir", str(hf_dir), "--out", str(mg), *VERIFY])
    assert _verified_diff(out) <= TOLERANCE
    meta = json.loads((mg / "c2f_checkpoint.json").read_text())
    assert meta["model"]["vocab_size"] == 1003 and meta["model"]["sliding_window"] == 8
    assert (
        meta["tokenizer"]["files"] == ["tokenizer.model", "generation_config.json"]
        and meta["tokenizer"]["vocab_size"] == 32000
    )
    run_python(TO_HF, ["--megatron-dir", str(mg), "--out", str(back), "--max-shard-size", "100KB"])
    assert_bitwise_equal(hf_dir, back)
    assert (back / "model.safetensors.index.json").is_file() and (back / "tokenizer.model").is_file()
    assert not list(tmp_path.glob("*.partial"))
    tokens = torch.arange(48).reshape(2, 24) * 37 % 1003
    with torch.no_grad():
        want = MistralForCausalLM.from_pretrained(hf_dir).eval()(tokens).logits
        got = MistralForCausalLM.from_pretrained(back).eval()(tokens).logits
    assert torch.equal(want, got)


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_parity_under_torchrun(hf_dir, tmp_path, layout):
    out = run_torchrun(
        TO_MEGATRON, 2, ["--hf-dir", str(hf_dir), "--out", str(tmp_path / "mg"), *layout, *VERIFY]
    )
    assert _verified_diff(out) <= TOLERANCE


def test_tp2pp2_roundtrip_is_bitwise(hf_dir, tmp_path):
    mg, back, back_tp2 = tmp_path / "mg", tmp_path / "hf", tmp_path / "hf_tp2"
    out = run_torchrun(
        TO_MEGATRON, 4, ["--hf-dir", str(hf_dir), "--out", str(mg), "--tp", "2", "--pp", "2", *VERIFY]
    )
    assert _verified_diff(out) <= TOLERANCE
    # loads at another layout (TP1 PP1, one process) and exports exactly
    run_python(TO_HF, ["--megatron-dir", str(mg), "--out", str(back)])
    assert_bitwise_equal(hf_dir, back)
    # export gathering TP shards, replacing an existing directory with --force
    back_tp2.mkdir()
    (back_tp2 / "stale.txt").write_text("old")
    run_torchrun(
        TO_HF,
        2,
        [
            "--megatron-dir",
            str(mg),
            "--out",
            str(back_tp2),
            "--tp",
            "2",
            "--force",
            "--max-shard-size",
            "100KB",
        ],
    )
    assert_bitwise_equal(hf_dir, back_tp2)
    assert not (back_tp2 / "stale.txt").exists()


# ------------------------------------------------------------------------------------------- refusals


def _copy_hf(hf_dir: Path, dest: Path, tensors: dict[str, torch.Tensor] | None = None, **config) -> Path:
    """A single-file variant of the tiny model with edited tensors and/or config fields."""
    dest.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(config)
    (dest / "config.json").write_text(json.dumps(cfg))
    save_file(tensors if tensors is not None else _tensors(hf_dir), str(dest / "model.safetensors"))
    return dest


def test_refuses_other_architectures(hf_dir, tmp_path):
    qwen = _copy_hf(hf_dir, tmp_path / "qwen", architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    with pytest.raises(ConversionError, match=r"config.json: field 'architectures'"):
        convert_hf_to_megatron(qwen, tmp_path / "out")
    mixtral = tmp_path / "mixtral"
    mixtral.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text()) | {"model_type": "mixtral"}
    (mixtral / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"field 'model_type'"):
        convert_hf_to_megatron(mixtral, tmp_path / "out")


def test_refuses_missing_extra_and_misshapen_tensors(hf_dir, tmp_path):
    tensors = _tensors(hf_dir)
    missing = dict(tensors)
    del missing["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match=r"missing tensor\(s\) model.layers.2.mlp.up_proj.weight"):
        convert_hf_to_megatron(_copy_hf(hf_dir, tmp_path / "a", missing), tmp_path / "out")
    extra = dict(tensors) | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    with pytest.raises(ConversionError, match=r"unexpected tensor\(s\) model.layers.0.self_attn.q_proj.bias"):
        convert_hf_to_megatron(_copy_hf(hf_dir, tmp_path / "b", extra), tmp_path / "out")
    bad = dict(tensors) | {"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, 64)}
    with pytest.raises(
        ConversionError, match=r"'model.layers.1.self_attn.k_proj.weight' has shape \[16, 64\]"
    ):
        convert_hf_to_megatron(_copy_hf(hf_dir, tmp_path / "c", bad), tmp_path / "out")


def test_refuses_pickle_only_directory(hf_dir, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(hf_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConversionError, match=r"pytorch_model.bin: pickle checkpoints are not read"):
        convert_hf_to_megatron(d, tmp_path / "out")


@pytest.mark.parametrize(
    "tp, pp, field",
    [(3, 1, "num_attention_heads"), (4, 1, "num_key_value_heads"), (1, 3, "num_hidden_layers")],
)
def test_refuses_layouts_that_do_not_divide(hf_dir, tmp_path, tp, pp, field):
    with pytest.raises(ConversionError, match=rf"field '{field}' = \d+ is not divisible by"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out", tp=tp, pp=pp)


def test_refuses_existing_output(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match=r"out: output already exists \(pass --force"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out")
    with pytest.raises(ConversionError, match=r"output already exists"):
        convert_megatron_to_hf(tmp_path / "nowhere", tmp_path / "out")


def test_export_refuses_value_checkpoints_and_bad_metadata(tmp_path):
    from c2f_megatron.checkpoint.megatron_dir import CheckpointError, CheckpointMetadata
    from c2f_megatron.models.config import ModelConfig

    ckpt = tmp_path / "rm"
    ckpt.mkdir()
    meta = CheckpointMetadata(model=ModelConfig(), kind="value")
    (ckpt / "c2f_checkpoint.json").write_text(json.dumps(meta.to_json()))
    with pytest.raises(ConversionError, match=r"field 'kind' is 'value'"):
        convert_megatron_to_hf(ckpt, tmp_path / "out")
    with pytest.raises(CheckpointError, match="c2f_checkpoint.json: missing"):
        convert_megatron_to_hf(tmp_path, tmp_path / "out2")


def test_cli_reports_refusal_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "c2f_megatron.cli",
            "convert",
            "hf-to-megatron",
            "--hf-dir",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "HF checkpoint directory not found" in proc.stderr and "Traceback" not in proc.stderr
