"""The streaming converters: the chunk plan against the layout functions, our archives and dcp index against
what torch writes, megatron's own writer and loader against our files, exports of megatron-written TP/PP
checkpoints, and memory that does not grow with depth (without importing torch).
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from c2f_megatron.checkpoint import dcp_files, manifest
from c2f_megatron.checkpoint import hf_mapping as hm
from c2f_megatron.models.config import DTYPES, ModelConfig
from tests.launch import REPO_ROOT, WORKERS, run_python, run_torchrun, worker_env

TO_MEGATRON = REPO_ROOT / "tools" / "convert_hf_to_megatron.py"
TO_HF = REPO_ROOT / "tools" / "convert_megatron_to_hf.py"


def _cfg(
    layers: int = 2, tied: bool = False, hidden: int = 64, ffn: int = 96, dtype: str = "fp32"
) -> ModelConfig:
    return ModelConfig(
        family="mistral",
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=24,  # not hidden / heads: q/k/v rows follow head_dim
        ffn_hidden_size=ffn,
        vocab_size=1003,  # padded to 1024 on disk
        max_position_embeddings=64,
        untie_embeddings_and_output_weights=not tied,
        params_dtype=dtype,
    )


def _random_hf(
    directory: Path, cfg: ModelConfig, seed: int = 0, shard_bytes: int = 200_000
) -> dict[str, torch.Tensor]:
    """A random HF directory of ``cfg`` in several safetensors shards (norms random too)."""
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        n: torch.randn(s, generator=gen).to(DTYPES[cfg.params_dtype])
        for n, s in hm.expected_hf_shapes(cfg).items()
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.numel() * t.element_size() > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * t.element_size()
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (directory / "config.json").write_text(json.dumps(hm.hf_config_from_model(cfg, cfg.params_dtype)))
    return tensors


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


def _assert_bitwise(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(want) == sorted(got)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), f"{name} differs"


# ------------------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_plan_builds_the_tensors_of_the_layout_functions(tied):
    """Filling every chunk from its pieces gives exactly the fused tensors of ``qkv_to_megatron`` /
    ``fc1_to_megatron`` / ``pad_vocab`` (the direct reference), and every HF element is used once."""
    cfg = _cfg(tied=tied)
    padded = cfg.padded_vocab_size(1)
    gen = torch.Generator().manual_seed(1)
    hf = {n: torch.randn(s, generator=gen) for n, s in hm.expected_hf_shapes(cfg).items()}
    shapes = hm.dist_shapes(cfg, padded)
    built = {k: torch.full(s, float("nan")) for k, s in shapes.items()}
    used = {n: torch.zeros(t.numel(), dtype=torch.int32) for n, t in hf.items()}
    for unit in hm.dist_units(cfg, padded):
        for chunk in unit:
            flat = torch.zeros(chunk.numel)
            for p in chunk.pieces:
                flat[p.dst : p.dst + p.n] = hf[p.hf].reshape(-1)[p.src : p.src + p.n]
                used[p.hf][p.src : p.src + p.n] += 1
            box = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
            assert torch.isnan(built[chunk.key][box]).all(), (
                f"{chunk.key} chunk {chunk.offsets} overlaps another"
            )
            built[chunk.key][box] = flat.view(chunk.sizes)
    assert all(bool((u == 1).all()) for u in used.values())
    d = cfg.head_dim
    for i in range(cfg.num_layers):
        L = lambda n, i=i: hf[hm.hf_layer_name(i, n)]  # noqa: E731
        want_qkv = hm.qkv_to_megatron(
            L("self_attn.q_proj.weight"), L("self_attn.k_proj.weight"), L("self_attn.v_proj.weight"), 4, 2
        )
        assert want_qkv.shape[0] == (4 + 2 * 2) * d
        assert torch.equal(built["decoder.layers.self_attention.linear_qkv.weight"][i], want_qkv)
        want_fc1 = hm.fc1_to_megatron(L("mlp.gate_proj.weight"), L("mlp.up_proj.weight"))
        assert torch.equal(built["decoder.layers.mlp.linear_fc1.weight"][i], want_fc1)
        assert torch.equal(built["decoder.layers.mlp.linear_fc2.weight"][i], L("mlp.down_proj.weight"))
        assert torch.equal(
            built["decoder.layers.self_attention.linear_proj.weight"][i], L("self_attn.o_proj.weight")
        )
        assert torch.equal(
            built["decoder.layers.self_attention.linear_qkv.layer_norm_weight"][i],
            L("input_layernorm.weight"),
        )
        assert torch.equal(
            built["decoder.layers.mlp.linear_fc1.layer_norm_weight"][i], L("post_attention_layernorm.weight")
        )
    # vocab rows past vocab_size are no piece's: the chunk buffer's zeros, as pad_vocab gives them
    want_emb = hm.pad_vocab(hf["model.embed_tokens.weight"], padded)
    assert torch.equal(built["embedding.word_embeddings.weight"], want_emb)
    assert ("output_layer.weight" in built) == (not tied)
    # read backwards, the same plan gives every HF tensor from the built global tensors
    for name, sources in hm.hf_row_sources(cfg, padded).items():
        rows = []
        for s in sources:
            g = built[s.key] if s.layer is None else built[s.key][s.layer]
            g = g.reshape(1, -1) if g.dim() == 1 else g
            rows.append((s.dst, g[s.row : s.row + s.n]))
        got = torch.cat([r for _, r in sorted(rows, key=lambda x: x[0])])
        assert torch.equal(got.reshape(hf[name].shape), hf[name]), name


# ------------------------------------------------------------------ files as torch writes them


@pytest.mark.parametrize("shape", [(5,), (1,), (3, 300), (2, 3, 4), (2, 3, 4, 5), (70000,), (2, 40000, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_tensor_archive_is_torch_saves(shape, dtype):
    """Our archive of a tensor has torch.save's tensor pickle byte for byte and its records in its order,
    passes zip's CRC check, and torch.load (weights_only) gives the tensor back."""
    st = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}[dtype]
    t = torch.randn(shape).to(dtype)
    buf = io.BytesIO()
    torch.save(t, buf)
    theirs = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    assert theirs.read("archive/data.pkl") == dcp_files.tensor_pickle(st, shape)
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    head, tail = dcp_files.tensor_archive(st, shape, len(raw), zlib.crc32(raw))
    ours = zipfile.ZipFile(io.BytesIO(head + raw + tail))
    assert ours.testzip() is None
    assert [i.filename for i in ours.infolist()] == [i.filename for i in theirs.infolist()]
    archive = head + raw + tail
    for info in ours.infolist():  # every record's data starts on a 64-byte boundary, as torch's do
        name_len, extra_len = struct.unpack("<HH", archive[info.header_offset + 26 : info.header_offset + 30])
        assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    back = torch.load(io.BytesIO(head + raw + tail), weights_only=True)
    assert back.dtype == dtype and torch.equal(back, t)
    for value in ([None], {}):
        assert torch.load(io.BytesIO(dcp_files.pickle_archive(value)), weights_only=True) == value


def test_dcp_index_pickle_is_torchs():
    """``index_pickle`` is the pickle of torch's own ``Metadata`` for the same chunks, byte for byte (the
    direct reference: the classes built with torch, pickled by pickle)."""
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    shapes = {"emb": ((4, 6), "bfloat16"), "layers.w": ((2, 3, 70000), "float32")}
    records = [
        {
            "file": "__0_0.distcp",
            "tensors": [("emb", (0, 0), (2, 6), 0, 100), ("emb", (2, 0), (2, 6), 100, 100)],
            "objects": [("layers.x/_extra_state/shard_0_2", 200, 10)],
        },
        {
            "file": "__1_0.distcp",
            "tensors": [("layers.w", (0, 0, 0), (2, 3, 70000), 0, 3 << 20)],
            "objects": [],
        },
    ]
    ours = dcp_files.index_pickle(shapes, records, "ckpt")
    sdm, storage = {}, {}
    for rec in records:
        for key, offsets, sizes, begin, length in rec["tensors"]:
            shape, dtype = shapes[key]
            if key not in sdm:
                props = TensorProperties(dtype=getattr(torch, dtype))
                sdm[key] = TensorStorageMetadata(props, torch.Size(shape), [])
            sdm[key].chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
            storage[MetadataIndex(key, offsets)] = _StorageInfo(rec["file"], begin, length)
        for key, begin, length in rec["objects"]:
            sdm[key] = BytesStorageMetadata()
            storage[MetadataIndex(key)] = _StorageInfo(rec["file"], begin, length)
    save_id = pickle.loads(ours).storage_meta.save_id
    ref = Metadata(
        state_dict_metadata=sdm,
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id="ckpt", save_id=save_id),
        version=CURRENT_DCP_VERSION,
    )
    assert ours == pickle.dumps(ref, protocol=2)
    with pytest.raises(RuntimeError, match="chunks cover 12 of 24"):
        dcp_files.index_pickle(
            shapes, [{**records[0], "tensors": records[0]["tensors"][:1]}, records[1]], "x"
        )


def test_crc32_combine_and_recording_file(tmp_path):
    """``crc32_combine`` against zlib on the joined bytes; a ``RecordingFile``'s record equals the one the
    manifest computes by reading the file back."""
    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 4096, 1 << 20, (3 << 20) + 5):
        a = torch.randint(0, 256, (int(torch.randint(0, 100, (1,), generator=gen)),), generator=gen)
        a, b = a.to(torch.uint8).numpy().tobytes(), torch.randint(0, 256, (n,), generator=gen).to(torch.uint8)
        b = b.numpy().tobytes()
        assert manifest.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b), n
    f = manifest.RecordingFile(tmp_path / "x.bin", "x.bin")
    pieces = [b"head", bytes(range(256)) * 300_000, b"tail"]  # past the 32 MB writeback step
    for i, piece in enumerate(pieces):
        f.write(piece, zlib.crc32(piece) if i == 1 else None)
    record = f.close()
    assert record == manifest.file_records(tmp_path, ["x.bin"], sync=False)[0]
    assert record.size == sum(map(len, pieces))


# ------------------------------------------------------------------ megatron's own writer and loader


@pytest.mark.parametrize(
    "tied,layout", [(False, ["--tp", "2"]), (True, ["--pp", "2"])], ids=["untied-tp2", "tied-pp2"]
)
def test_megatron_loads_streamed_files_and_its_own_files_export_exactly(tmp_path, tied, layout):
    """Our files, loaded by megatron at TP2 / PP2 and saved again by megatron's writer (column-split and
    per-rank chunks), hold the same keys, shapes and dtypes as megatron's, and export bit for bit."""
    cfg = _cfg(tied=tied, dtype="bf16")
    want = _random_hf(tmp_path / "hf", cfg)
    ours, theirs, back = tmp_path / "ours", tmp_path / "theirs", tmp_path / "back"
    run_python(TO_MEGATRON, ["--hf-dir", str(tmp_path / "hf"), "--out", str(ours), "--tp", "2"])
    run_torchrun(WORKERS / "convert_resave.py", 2, ["--src", str(ours), "--out", str(theirs), *layout])
    a, b = dcp_files.read_index(ours / "model"), dcp_files.read_index(theirs / "model")
    assert {k: (t.shape, t.dtype) for k, t in a.tensors.items()} == {
        k: (t.shape, t.dtype) for k, t in b.tensors.items()
    }
    assert set(a.objects) == set(b.objects)
    assert {k: t.shape for k, t in a.tensors.items()} == hm.dist_shapes(cfg, cfg.padded_vocab_size(2))
    assert set(a.objects) == {
        k for i in range(cfg.num_layers) for k in hm.extra_state_keys(i, cfg.num_layers)
    }
    if "--tp" in layout:  # megatron split the row-parallel layers by columns: the assembler's block path
        proj = b.tensors["decoder.layers.self_attention.linear_proj.weight"]
        assert any(c.offsets[-1] > 0 for c in proj.chunks)
    run_python(TO_HF, ["--megatron-dir", str(theirs), "--out", str(back), "--max-shard-size", "150KB"])
    _assert_bitwise(want, _hf_tensors(back))
    assert len(list(back.glob("*.safetensors"))) > 1 and (back / "model.safetensors.index.json").is_file()


def test_export_casts_and_refuses_a_damaged_chunk_archive(tmp_path):
    cfg = _cfg(dtype="bf16")
    want = _random_hf(tmp_path / "hf", cfg)
    mg = tmp_path / "mg"
    run_python(TO_MEGATRON, ["--hf-dir", str(tmp_path / "hf"), "--out", str(mg), "--dtype", "fp32"])
    index = dcp_files.read_index(mg / "model")
    assert {t.dtype for t in index.tensors.values()} == {"F32"}
    run_python(TO_HF, ["--megatron-dir", str(mg), "--out", str(tmp_path / "back"), "--dtype", "bf16"])
    _assert_bitwise(want, _hf_tensors(tmp_path / "back"))  # bf16 -> fp32 -> bf16 is exact
    # a chunk archive whose tensor pickle was replaced by something else: one line, nothing written
    chunk = index.tensors["decoder.final_layernorm.weight"].chunks[0]
    path = mg / "model" / chunk.file
    data = bytearray(path.read_bytes())
    start = data.index(b"PK\x03\x04", chunk.begin)
    data[start : start + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    (mg / "c2f_manifest.json").unlink()  # past the manifest, as a checkpoint from elsewhere would be
    proc = subprocess.run(
        [sys.executable, str(TO_HF), "--megatron-dir", str(mg), "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "decoder.final_layernorm.weight" in lines[0] and "not a plain tensor archive" in lines[0], lines[0]
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


# --------------------------------------------------------------------------------- memory and depth


# Runs a tool as __main__ and prints its VmHWM (the peak RSS of this process image: unlike rusage's
# ru_maxrss, it does not carry over the forking parent's memory).
_HWM = (
    "import runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "finally:\n"
    "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
    "    print('HWM', int(hwm.split()[1]) * 1024, 'torch' in sys.modules)\n"
)


def _peak_rss(tool: Path, args: list[str]) -> int:
    """Peak RSS (bytes) of one run of a converter tool, which must not have imported torch."""
    proc = subprocess.run(
        [sys.executable, "-c", _HWM, str(tool), *args],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, hwm, imported = proc.stdout.strip().splitlines()[-1].split()
    assert imported == "False", f"{tool.name} imported torch"
    return int(hwm)


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """4 and 32 layers of ~3.4 MB: the 28 extra layers (96 MB) may add at most 3 layers to the peak RSS of
    either direction (a converter that held the model would add all of them). Neither imports torch."""
    peaks = {}
    layer_bytes = 0
    for layers in (4, 32):
        cfg = _cfg(layers=layers, hidden=256, ffn=1024)
        tensors = _random_hf(tmp_path / f"hf{layers}", cfg, shard_bytes=50_000_000)
        layer_bytes = sum(t.numel() * 4 for n, t in tensors.items() if n.startswith("model.layers.0."))
        mg, back = tmp_path / f"mg{layers}", tmp_path / f"back{layers}"
        del tensors
        peaks[layers] = (
            _peak_rss(TO_MEGATRON, ["--hf-dir", str(tmp_path / f"hf{layers}"), "--out", str(mg)]),
            _peak_rss(TO_HF, ["--megatron-dir", str(mg), "--out", str(back)]),
        )
    growth = [b - a for a, b in zip(peaks[4], peaks[32])]
    assert layer_bytes > 3_000_000
    print(
        f"peak RSS MB (to megatron, to HF): 4 layers {[p / 1e6 for p in peaks[4]]}, 32 {[p / 1e6 for p in peaks[32]]}"
    )
    assert max(growth) < 3 * layer_bytes, f"peak RSS grew by {[g / 1e6 for g in growth]} MB over 28 layers"
