"""HF mode of the merger: bitwise results, sweeps, N-way/task vector, refusals, atomic output, HF loadability."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from c2f_megatron.checkpoint.hf_dir import INDEX_FILE
from c2f_megatron.merge import hf as merge_hf_module
from c2f_megatron.merge.cli import main as merge_main
from c2f_megatron.merge.hf import PROVENANCE_FILE

CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "vocab_size": 50,
    "torch_dtype": "bfloat16",
    "_name_or_path": "x",
}
SHAPES = {
    "model.embed_tokens.weight": (50, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.1.mlp.down_proj.weight": (16, 40),
    "model.norm.weight": (16,),
    "lm_head.weight": (50, 16),
}


def make_hf(
    path: Path,
    seed: int,
    dtype=torch.bfloat16,
    shards: int = 2,
    config=None,
    shapes=None,
    tokenizer: str = '{"vocab": 50}',
    dtypes: dict[str, torch.dtype] | None = None,
    specials: bool = False,
) -> Path:
    """A random HF safetensors dir, sharded with an index like ``save_pretrained`` (or one file).

    ``dtypes`` overrides the dtype of some tensors; ``specials`` puts +-0, +-inf, NaN and subnormals at
    random places of every tensor."""
    shapes = shapes or SHAPES
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        n: (torch.randn(s, generator=gen) * 2).to((dtypes or {}).get(n, dtype)) for n, s in shapes.items()
    }
    if specials:
        values = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e-39, 1e-45])
        for t in tensors.values():
            flat = t.view(-1)
            where = torch.randint(0, flat.numel(), (len(values),), generator=gen)
            flat[where] = values.to(t.dtype)
    path.mkdir(parents=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
            save_file(part, str(path / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    (path / "tokenizer.json").write_text(tokenizer)
    return path


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def ab(tmp_path) -> tuple[Path, Path]:
    return make_hf(tmp_path / "a", 1), make_hf(tmp_path / "b", 2)


def merge(*argv: str) -> None:
    assert merge_main([str(a) for a in argv]) == 0


def test_linear_bitwise_fp32_and_bf16_rounded_once(ab, tmp_path, monkeypatch):
    monkeypatch.setattr(merge_hf_module, "IO_CHUNK", 100)  # chunk borders inside tensors
    a, b = ab
    merge("--a", a, "--b", b, "--gamma", "0.7", "--out", tmp_path / "o32", "--dtype", "fp32")
    merge("--a", a, "--b", b, "--gamma", "0.7", "--out", tmp_path / "o16")
    ta, tb, o32, o16 = (read_all(p) for p in (a, b, tmp_path / "o32", tmp_path / "o16"))
    assert set(o32) == set(ta) == set(o16)
    for name in ta:
        direct = 0.7 * ta[name].float() + (1 - 0.7) * tb[name].float()
        assert o32[name].dtype == torch.float32 and torch.equal(o32[name], direct), name
        assert o16[name].dtype == torch.bfloat16 and torch.equal(o16[name], direct.bfloat16()), name
    # Same shard files and index as the input, index total_size recomputed for the output dtype.
    assert sorted(p.name for p in (tmp_path / "o16").glob("*.safetensors")) == sorted(
        p.name for p in a.glob("*.safetensors")
    )
    index = json.loads((tmp_path / "o32" / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in ta.values())
    assert json.loads((tmp_path / "o32" / "config.json").read_text())["torch_dtype"] == "float32"
    assert (tmp_path / "o16" / "tokenizer.json").read_text() == (a / "tokenizer.json").read_text()
    record = json.loads((tmp_path / "o16" / PROVENANCE_FILE).read_text())
    assert record["gamma"] == 0.7 and record["dtype"] == "bf16" and record["tool"] == "c2f_megatron.merge"
    assert [s["path"] for s in record["sources"]] == [str(a.resolve()), str(b.resolve())]
    with safe_open(str(next((tmp_path / "o16").glob("*.safetensors"))), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["c2f_merge"])["gamma"] == 0.7


def test_sweep_equals_separate_runs(ab, tmp_path):
    a, b = ab
    merge("--a", a, "--b", b, "--gamma", "0.1:0.9:0.4", "--out", tmp_path / "sweep")
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [
        "gamma_0.10",
        "gamma_0.50",
        "gamma_0.90",
    ]
    for g in ("0.10", "0.50", "0.90"):
        merge("--a", a, "--b", b, "--gamma", g, "--out", tmp_path / f"single_{g}")
        swept, single = read_all(tmp_path / "sweep" / f"gamma_{g}"), read_all(tmp_path / f"single_{g}")
        assert all(torch.equal(swept[n], single[n]) for n in single)
    assert not list(tmp_path.rglob("*.partial"))


def test_task_vector_and_n_way(tmp_path):
    a, b, base = make_hf(tmp_path / "a", 1), make_hf(tmp_path / "b", 2, shards=1), make_hf(tmp_path / "c", 3)
    merge("--a", a, "--b", b, "--base", base, "--gamma", "0.6", "--out", tmp_path / "task")
    merge("--model", f"{a}:0.5", "--model", f"{b}:0.3", "--model", f"{base}:0.2", "--out", tmp_path / "nway")
    ta, tb, tc = read_all(a), read_all(b), read_all(base)
    task, nway = read_all(tmp_path / "task"), read_all(tmp_path / "nway")
    for n in ta:
        assert torch.equal(task[n], (tb[n].float() + 0.6 * (ta[n].float() - tc[n].float())).bfloat16())
        assert torch.equal(
            nway[n], (0.5 * ta[n].float() + 0.3 * tb[n].float() + 0.2 * tc[n].float()).bfloat16()
        )
    record = json.loads((tmp_path / "task" / PROVENANCE_FILE).read_text())
    assert record["formula"] == "b + gamma * (a - base)" and [s["role"] for s in record["sources"]] == [
        "a",
        "b",
        "base",
    ]


def test_output_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        transformers.MistralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / name)
    merge("--a", tmp_path / "a", "--b", tmp_path / "b", "--gamma", "0.7", "--out", tmp_path / "o")
    models = [
        transformers.MistralForCausalLM.from_pretrained(tmp_path / n, dtype=torch.bfloat16)
        for n in ("a", "b", "o")
    ]
    sa, sb, so = (m.state_dict() for m in models)
    for n in sa:
        assert torch.equal(so[n], (0.7 * sa[n].float() + (1 - 0.7) * sb[n].float()).bfloat16()), n


def refused(capsys, *argv) -> str:
    assert merge_main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


def test_refuses_different_config_field(tmp_path, capsys):
    a = make_hf(tmp_path / "a", 1)
    b = make_hf(tmp_path / "b", 2, config={**CONFIG, "rope_theta": 1e6, "_name_or_path": "other"})
    err = refused(capsys, "--a", a, "--b", b, "--gamma", "0.7", "--out", tmp_path / "o")
    assert "'rope_theta'" in err and "config.json" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_refuses_different_tensor_names_and_shapes(tmp_path, capsys):
    a = make_hf(tmp_path / "a", 1)
    renamed = {("lm_head.bias" if n == "lm_head.weight" else n): s for n, s in SHAPES.items()}
    b = make_hf(tmp_path / "b", 2, shapes=renamed)
    err = refused(capsys, "--a", a, "--b", b, "--gamma", "0.7", "--out", tmp_path / "o")
    assert "'lm_head.weight'" in err
    c = make_hf(tmp_path / "c", 2, shapes={**SHAPES, "model.norm.weight": (17,)})
    err = refused(capsys, "--a", a, "--b", c, "--gamma", "0.7", "--out", tmp_path / "o")
    assert "'model.norm.weight'" in err and "[16]" in err and "[17]" in err
    d = make_hf(tmp_path / "d", 2, dtype=torch.float32)
    err = refused(capsys, "--a", a, "--b", d, "--gamma", "0.7", "--out", tmp_path / "o")
    assert "dtype" in err


def test_refuses_different_tokenizer_and_vocab(tmp_path, capsys):
    a = make_hf(tmp_path / "a", 1)
    b = make_hf(tmp_path / "b", 2, tokenizer='{"vocab": 51}')
    err = refused(capsys, "--a", a, "--b", b, "--gamma", "0.7", "--out", tmp_path / "o")
    assert "tokenizer.json" in err
    c = make_hf(tmp_path / "c", 2, config={**CONFIG, "vocab_size": 51})
    err = refused(capsys, "--a", a, "--b", c, "--gamma", "0.7", "--out", tmp_path / "o")
    assert "'vocab_size'" in err


def test_refuses_bad_gamma_existing_output_and_bad_inputs(ab, tmp_path, capsys):
    a, b = ab
    assert "outside [0, 1]" in refused(capsys, "--a", a, "--b", b, "--gamma", "1.2", "--out", tmp_path / "o")
    (tmp_path / "o").mkdir()
    err = refused(capsys, "--a", a, "--b", b, "--gamma", "0.7", "--out", tmp_path / "o")
    assert "already exists" in err
    merge("--a", a, "--b", b, "--gamma", "0.7", "--out", tmp_path / "o", "--force")
    assert (tmp_path / "o" / PROVENANCE_FILE).is_file()
    err = refused(capsys, "--a", a, "--b", tmp_path / "missing", "--gamma", "0.7", "--out", tmp_path / "o2")
    assert "missing" in err and "not found" in err
    broken = tmp_path / "broken"
    shutil.copytree(b, broken)
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    err = refused(capsys, "--a", a, "--b", broken, "--gamma", "0.7", "--out", tmp_path / "o3")
    assert shard.name in err and "truncated" in err


def test_interrupted_run_leaves_nothing_that_looks_complete(ab, tmp_path, monkeypatch):
    a, b = ab
    calls = {"n": 0}
    real_write = merge_hf_module.StreamedShardFile.write

    def failing_write(self, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        real_write(self, data)

    monkeypatch.setattr(merge_hf_module.StreamedShardFile, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        merge_main(["--a", str(a), "--b", str(b), "--gamma", "0.3,0.7", "--out", str(tmp_path / "o")])
    # the interrupted run removed both .partial directories and the sweep directory it had made
    assert not (tmp_path / "o").exists()
    (tmp_path / "o" / "gamma_0.30.partial").mkdir(parents=True)  # what a kill -9 leaves
    monkeypatch.setattr(merge_hf_module.StreamedShardFile, "write", real_write)
    merge("--a", a, "--b", b, "--gamma", "0.3,0.7", "--out", tmp_path / "o")  # a rerun replaces the leftovers
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["gamma_0.30", "gamma_0.70"]


def _fixed_time_provenance(monkeypatch) -> None:
    """Provenance without its timestamp, so two runs write byte-identical files."""
    real = merge_hf_module.provenance
    monkeypatch.setattr(merge_hf_module, "provenance", lambda *a, **k: {**real(*a, **k), "created": "t"})


@pytest.mark.parametrize(
    "in_dtype, out_dtype, kind",
    [
        (torch.bfloat16, None, "sweep"),
        (torch.bfloat16, "fp32", "linear"),
        (torch.float32, "bf16", "task"),
        (torch.float16, None, "linear"),
        (torch.float32, None, "mixed"),  # one float64 tensor: the native run uses torch for it alone
    ],
)
def test_native_and_torch_paths_write_identical_bytes(tmp_path, monkeypatch, in_dtype, out_dtype, kind):
    from c2f_megatron.merge.engine import BufferMerger
    from c2f_megatron.merge.recipe import MergeRecipe

    _fixed_time_provenance(monkeypatch)
    monkeypatch.setattr(merge_hf_module, "IO_CHUNK", 100)  # chunk borders inside tensors
    dtypes = {"model.norm.weight": torch.float64} if kind == "mixed" else None
    ins = [
        make_hf(tmp_path / n, s, in_dtype, dtypes=dtypes, specials=True)
        for n, s in (("a", 1), ("b", 2), ("c", 3))
    ]
    if kind == "task":
        roles, recipes = ["a", "b", "base"], [MergeRecipe("task", (0.6,))]
    else:
        ins = ins[:2]
        gammas = (0.1, 0.7, 1.0) if kind == "sweep" else (0.7,)
        roles, recipes = ["a", "b"], [MergeRecipe("weighted", (g, 1.0 - g)) for g in gammas]
    written = {}
    for mode in ("native", "torch"):
        monkeypatch.setenv("C2F_MERGE_NATIVE", "1" if mode == "native" else "0")
        merger = BufferMerger(recipes)
        outs = [tmp_path / mode / f"o{i}" for i in range(len(recipes))]
        merge_hf_module.merge_hf(ins, roles, recipes, outs, dtype=out_dtype, merger=merger)
        expected = {"native", "torch"} if (mode == "native" and kind == "mixed") else {mode}
        assert merger.used == expected
        written[mode] = {
            p.relative_to(tmp_path / mode): p.read_bytes()
            for p in (tmp_path / mode).rglob("*")
            if p.is_file()
        }
    assert written["native"].keys() == written["torch"].keys()
    assert any(p.suffix == ".safetensors" for p in written["native"])
    for rel, data in written["native"].items():
        assert data == written["torch"][rel], rel
    merged = read_all(tmp_path / "native" / "o0")
    assert any(torch.isnan(t).any() for t in merged.values())  # the special values went through


def _imported_modules(stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_hf_command_line_does_not_import_torch(ab, tmp_path):
    a, b = ab
    tool = Path(__file__).resolve().parents[1] / "tools" / "merge_checkpoints.py"
    runs = {}
    for switch in ("1", "0"):
        out = tmp_path / f"o{switch}"
        env = dict(os.environ, C2F_MERGE_NATIVE=switch)
        proc = subprocess.run(
            [
                sys.executable,
                "-X",
                "importtime",
                str(tool),
                "--a",
                str(a),
                "--b",
                str(b),
                "--gamma",
                "0.7",
                "--out",
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[switch] = _imported_modules(proc.stderr)
        assert (out / PROVENANCE_FILE).is_file()
    assert "c2f_megatron.merge.hf" in runs["1"]
    assert not {m for m in runs["1"] if m == "torch" or m.startswith("torch.")}
    assert "torch" in runs["0"]  # the check sees torch where it is imported (forced torch path)
