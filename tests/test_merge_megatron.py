"""Megatron mode of the merger: TP2 inputs merged rank-parallel into TP1 (sweep) and PP2 layouts, checked
bitwise against the direct formula after loading; refusals checked in-process (they precede any init)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from c2f_megatron.checkpoint.megatron_dir import METADATA_FILE, CheckpointMetadata
from c2f_megatron.merge.cli import main as merge_main
from c2f_megatron.models.config import get_preset
from tests.launch import REPO_ROOT, run_python, run_torchrun

TOOL = REPO_ROOT / "tools" / "merge_checkpoints.py"


@pytest.fixture(scope="module")
def tp2_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("megatron_inputs")
    run_torchrun("merge_make_megatron.py", 2, ["--out-dir", str(root), "--tp", "2"])
    return root


def test_tp2_inputs_merge_into_tp1_sweep_pp2_and_task_vector(tp2_inputs, tmp_path):
    a, b, base = (str(tp2_inputs / n) for n in ("a", "b", "base"))
    sweep, pp2, task = tmp_path / "sweep", tmp_path / "pp2", tmp_path / "task"
    # 2 ranks at TP1 (data-parallel replicas), two gammas from one load: bf16 outputs.
    run_torchrun(TOOL, 2, ["--a", a, "--b", b, "--gamma", "0.3,0.7", "--out", str(sweep)])
    # 2 ranks at PP2, one gamma, fp32 output.
    run_torchrun(
        TOOL, 2, ["--a", a, "--b", b, "--gamma", "0.7", "--out", str(pp2), "--pp", "2", "--dtype", "fp32"]
    )
    # A plain single process (world of 1): task vector.
    run_python(TOOL, ["--a", a, "--b", b, "--base", base, "--gamma", "0.5", "--out", str(task)])
    assert sorted(p.name for p in sweep.iterdir()) == ["gamma_0.30", "gamma_0.70"]
    out = run_python(
        "merge_verify_megatron.py",
        [
            "--a",
            a,
            "--b",
            b,
            "--base",
            base,
            "--check",
            f"{sweep / 'gamma_0.30'}:linear:0.3",
            "--check",
            f"{sweep / 'gamma_0.70'}:linear:0.7",
            "--check",
            f"{pp2}:linear:0.7",
            "--check",
            f"{task}:task:0.5",
        ],
    )
    assert out.count("OK ") == 4, out
    assert '"pipeline_model_parallel_size": 2' in out
    meta = json.loads((pp2 / METADATA_FILE).read_text())
    assert meta["dtype"] == "fp32" and meta["model"]["params_dtype"] == "fp32"
    record = meta["provenance"]["merge"]
    assert record["gamma"] == 0.7 and record["formula"] == "gamma * a + (1 - gamma) * b"
    assert [s["role"] for s in record["sources"]] == ["a", "b"] and record["sources"][0]["path"] == a
    assert not list(tmp_path.glob("*.partial"))


def _fake_checkpoint(path: Path, **overrides) -> Path:
    """Only ``c2f_checkpoint.json``: the refusals below happen before any shard is read."""
    tokenizer = overrides.pop("tokenizer", {"kind": "test", "vocab_size": 1000})
    cfg = get_preset("mistral-nano", **{"vocab_size": 1000, "params_dtype": "bf16", **overrides})
    path.mkdir(parents=True)
    meta = CheckpointMetadata(model=cfg, tokenizer=tokenizer, dtype=cfg.params_dtype)
    (path / METADATA_FILE).write_text(json.dumps(meta.to_json()))
    return path


def _refused(capsys, argv: list[str]) -> str:
    assert merge_main(argv) == 2
    return capsys.readouterr().err


def test_refuses_different_hyper_parameter(tmp_path, capsys):
    a = _fake_checkpoint(tmp_path / "a")
    b = _fake_checkpoint(tmp_path / "b", rotary_base=1e6)
    err = _refused(capsys, ["--a", str(a), "--b", str(b), "--gamma", "0.7", "--out", str(tmp_path / "o")])
    assert "model.rotary_base" in err and str(b / METADATA_FILE) in err
    assert not (tmp_path / "o").exists()


def test_run_time_fields_are_not_the_architecture(tmp_path):
    """A PPO actor saved with the sdpa spec merges with the converted base model (spec 'auto'): the layer
    spec and dropouts are run-time choices."""
    from c2f_megatron.merge.megatron import check_metadata

    a = _fake_checkpoint(tmp_path / "a", layer_spec="sdpa", hidden_dropout=0.1)
    b = _fake_checkpoint(tmp_path / "b", layer_spec="auto")
    assert len(check_metadata([a, b], ["--a", "--b"], dtype=None)) == 2


def test_refuses_different_tokenizer(tmp_path, capsys):
    a = _fake_checkpoint(tmp_path / "a")
    b = _fake_checkpoint(tmp_path / "b", tokenizer={"kind": "test", "vocab_size": 999})
    err = _refused(capsys, ["--a", str(a), "--b", str(b), "--gamma", "0.7", "--out", str(tmp_path / "o")])
    assert "tokenizer" in err


def test_params_dtype_difference_needs_explicit_dtype(tmp_path, capsys):
    a = _fake_checkpoint(tmp_path / "a")
    b = _fake_checkpoint(tmp_path / "b", params_dtype="fp32")
    err = _refused(capsys, ["--a", str(a), "--b", str(b), "--gamma", "0.7", "--out", str(tmp_path / "o")])
    assert "model.params_dtype" in err
    from c2f_megatron.merge.megatron import check_metadata

    metas = check_metadata([a, b], ["--a", "--b"], dtype="bf16")  # accepted once the output dtype is chosen
    assert [m.model.params_dtype for m in metas] == ["bf16", "fp32"]


def test_refuses_existing_output_and_mixed_formats(tmp_path, capsys):
    a = _fake_checkpoint(tmp_path / "a")
    b = _fake_checkpoint(tmp_path / "b")
    (tmp_path / "o").mkdir()
    err = _refused(capsys, ["--a", str(a), "--b", str(b), "--gamma", "0.7", "--out", str(tmp_path / "o")])
    assert "already exists" in err and "--force" in err
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    err = _refused(capsys, ["--a", str(a), "--b", str(hf), "--gamma", "0.7", "--out", str(tmp_path / "o2")])
    assert "mix checkpoint formats" in err


def test_refuses_layout_that_does_not_divide_the_model(tmp_path, capsys):
    a = _fake_checkpoint(tmp_path / "a")
    b = _fake_checkpoint(tmp_path / "b")
    err = _refused(
        capsys, ["--a", str(a), "--b", str(b), "--gamma", "0.7", "--out", str(tmp_path / "o"), "--pp", "3"]
    )
    assert "--pp 3" in err or "pipeline" in err
