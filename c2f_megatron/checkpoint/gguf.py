"""Exact llama.cpp GGUF (Llama architecture) -> HF ``LlamaForCausalLM`` directory, streaming tensor by tensor.

Format facts the conversion rests on:

* **Reversed shapes.** GGUF stores a tensor's dimensions in ggml ``ne`` order, fastest-moving first: an HF
  ``[out, in]`` weight is listed as ``[in, out]``. The bytes are the same row-major layout, so reading
  the data with the reversed shape gives the HF ``[out, in]`` tensor without any transpose (``GGUFReader``
  already hands out the data in that numpy order).
* **Q/K row permutation.** llama.cpp's ``convert_hf_to_gguf`` reorders the rows of ``q_proj`` (with
  ``n_head`` heads) and ``k_proj`` (with ``n_head_kv`` heads) from HF's half-split rotary layout to the
  interleaved pairs ggml's RoPE uses: within each head, row ``j * dim/2 + i`` moves to ``2 * i + j``.
  :func:`unpermute_qk` undoes it exactly as transformers' ``LlamaTensorProcessor`` does. It moves rows
  only, so it commutes with dequantization (a quantization block never spans two rows).
* **Tied embeddings.** llama.cpp writes ``output.weight`` only when the LM head is not the embedding
  matrix; its absence means ``tie_word_embeddings: true`` and no ``lm_head.weight`` is written.
* **Dequantization is exact in fp32.** F16/BF16 widen to fp32 exactly. A block type stores small
  integers ``q`` with fp16 scales; ``scale * q`` (an 11-bit mantissa times at most 8 bits) always fits
  fp32's 24, so Q8_0/Q4_0/Q5_0 decode exactly; types with a min or nested scales (Q4_1, Q5_1, K-quants)
  can round in the last float32 bit, deterministically. The values are those of ``gguf.quants.dequantize``, the function
  transformers' GGUF loader calls, so the fp32 output equals bitwise what
  ``from_pretrained(dir, gguf_file=...)`` builds. ``bf16``/``fp16`` outputs round once from those fp32
  values (fp16 refuses a tensor that would overflow).

The whole file is checked (magic, truncation, architecture, metadata keys a plain Llama cannot express,
tensor names, types and shapes) before anything is written; output goes to ``OUT.partial`` and is renamed
at the end; any failure removes the ``.partial``. The tokenizer (vocabulary, merges, special tokens, chat
template) is converted by transformers' own GGUF tokenizer code, saved, reloaded and checked to encode
the same. A GGUF without ``tokenizer.ggml.model`` converts to weights + config only (no tokenizer files).
Refusals raise :class:`ConversionError` with one line naming the file and the key or tensor.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from c2f_megatron.checkpoint.atomic_dir import cleanup_on_failure, commit_output, prepare_output
from c2f_megatron.checkpoint.convert import DEFAULT_MAX_SHARD, ConversionReport
from c2f_megatron.checkpoint.gguf_reader import (
    _LAYER_RE,
    GLOBAL_TENSORS,
    LAYER_TENSORS,
    SUPPORTED_TYPES,
    _one_line,
    hf_config_from_gguf,
    metadata_value,
    open_gguf,
    smollm2_gguf_path,
)
from c2f_megatron.checkpoint.hf_dir import ShardWriter, name_shards, parse_size
from c2f_megatron.checkpoint.hf_mapping import ConversionError
from c2f_megatron.models.config import DTYPES

__all__ = ["convert_gguf_to_hf", "smollm2_gguf_path", "unpermute_qk"]

# ---------------------------------------------------------------------------------------------- tensors


def hf_name_of(gguf_name: str, num_layers: int) -> str | None:
    """The HF name of a llama.cpp tensor name, ``None`` for a tensor a plain Llama has no place for."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and int(match.group(1)) < num_layers and match.group(2) in LAYER_TENSORS:
        if match.group(1) != str(int(match.group(1))):  # blk.01 is not a llama.cpp name
            return None
        return f"model.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}.weight"
    return None


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF ``[out, in]`` shape of every tensor of the config (``lm_head`` included; optional when tied)."""
    hidden, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, q),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        }
    return shapes


def unpermute_qk(weight: Tensor, n_head: int) -> Tensor:
    """Undo llama.cpp's ``permute(w, n_head, n_head_kv)`` on the rows of a q (``n_head``) or k
    (``n_head_kv``) weight: per head, interleaved rotary pairs back to HF's two halves.

    Same as transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def dequantize_tensor(tensor: Any) -> Tensor:
    """A ``GGUFReader`` tensor as float32 in HF (reversed ggml) shape, via ``gguf.quants.dequantize``."""
    import numpy as np
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.tensor_type)
    # F32 comes back as a read-only view of the file's memory map: copy it; decoded blocks are fresh
    values = np.require(values, dtype=np.float32, requirements=["C", "W"])
    return torch.from_numpy(values).reshape(tuple(reversed(tensor.shape.tolist())))


@dataclass
class GGUFPlan:
    """A GGUF file checked and mapped: nothing read beyond the header yet."""

    path: Path
    reader: Any
    config: dict[str, Any]
    tensors: list[tuple[Any, str]] = field(default_factory=list)  # (ReaderTensor, HF name), file order
    has_tokenizer: bool = False

    @property
    def tensor_types(self) -> dict[str, int]:
        return dict(sorted(Counter(t.tensor_type.name for t, _ in self.tensors).items()))


def plan_gguf_conversion(gguf_path: str | Path, dtype: str = "fp32") -> GGUFPlan:
    """Open and check the whole file (metadata, names, types, shapes) before any tensor is decoded."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: use one of {sorted(DTYPES)}")
    path = Path(gguf_path)
    reader = open_gguf(path)
    cfg = hf_config_from_gguf(reader, str(path), dtype)
    shapes = expected_shapes(cfg)
    plan = GGUFPlan(path, reader, cfg, has_tokenizer="tokenizer.ggml.model" in reader.fields)
    seen: set[str] = set()
    for t in reader.tensors:
        hf_name = hf_name_of(t.name, cfg["num_hidden_layers"])
        if hf_name is None:
            raise ConversionError(
                f"{path}: tensor {t.name!r} ({t.tensor_type.name}) has no place in a plain LlamaForCausalLM"
            )
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ConversionError(
                f"{path}: tensor {t.name!r} has ggml type {t.tensor_type.name}, which this converter does "
                f"not dequantize (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        shape = tuple(reversed(t.shape.tolist()))
        if shape != shapes[hf_name]:
            raise ConversionError(
                f"{path}: tensor {t.name!r} has shape {list(shape)} (HF order), the metadata implies "
                f"{list(shapes[hf_name])}"
            )
        seen.add(hf_name)
        plan.tensors.append((t, hf_name))
    gguf_names = {v: k for k, v in GLOBAL_TENSORS.items()}
    for hf_name in shapes:
        if hf_name not in seen and hf_name != "lm_head.weight":
            match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
            name = gguf_names.get(hf_name)
            if match:
                leaf = next(k for k, v in LAYER_TENSORS.items() if v == match.group(2))
                name = f"blk.{match.group(1)}.{leaf}.weight"
            raise ConversionError(f"{path}: tensor {name!r} missing")
    return plan


def iter_hf_tensors(plan: GGUFPlan, dtype: str = "fp32") -> Iterator[tuple[str, Tensor]]:
    """``(HF name, tensor)`` one at a time in file order: dequantized, Q/K un-permuted, cast once."""
    target = DTYPES[dtype]
    heads, kv_heads = plan.config["num_attention_heads"], plan.config["num_key_value_heads"]
    for t, hf_name in plan.tensors:
        weight = dequantize_tensor(t)
        if hf_name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_qk(weight, heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_qk(weight, kv_heads)
        if target != torch.float32:
            cast = weight.to(target)
            if target == torch.float16 and bool((torch.isinf(cast) & ~torch.isinf(weight)).any()):
                raise ConversionError(
                    f"{plan.path}: tensor {t.name!r} overflows fp16 (max |x| = "
                    f"{weight.abs().max().item():.4g}); use --dtype bf16 or fp32"
                )
            weight = cast
        yield hf_name, weight


# ---------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(path: Path) -> Any:
    """transformers' own GGUF tokenizer conversion (vocabulary, merges, special tokens, chat template)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ConversionError(
            f"{path}: key tokenizer.ggml.model: transformers cannot build this tokenizer "
            f"({type(exc).__name__}: {_one_line(exc)})"
        ) from exc


def _probe_texts(tokenizer: Any) -> list[str]:
    texts = ["Hello world! 123", " leading space\nand a newline"]
    texts += [tok for tok in tokenizer.all_special_tokens]
    if tokenizer.chat_template:
        chat = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    return texts


def save_tokenizer(tokenizer: Any, directory: Path, source: str) -> None:
    """``save_pretrained`` into ``directory``, then reload and check it is the same tokenizer."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(directory))
    reloaded = AutoTokenizer.from_pretrained(str(directory))
    checks = {
        "vocabulary": (tokenizer.get_vocab(), reloaded.get_vocab()),
        "special tokens": (tokenizer.special_tokens_map, reloaded.special_tokens_map),
        "special token ids": (tokenizer.all_special_ids, reloaded.all_special_ids),
        "chat template": (tokenizer.chat_template, reloaded.chat_template),
        "encodings": (
            [tokenizer.encode(t) for t in _probe_texts(tokenizer)],
            [reloaded.encode(t) for t in _probe_texts(tokenizer)],
        ),
    }
    for what, (before, after) in checks.items():
        if before != after:
            raise ConversionError(f"{source}: the saved tokenizer does not reload with the same {what}")


# ---------------------------------------------------------------------------------------------- convert


def convert_gguf_to_hf(
    gguf_path: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    force: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
) -> ConversionReport:
    """Convert a Llama-architecture GGUF into an HF directory ``out`` (weights, config, tokenizer)."""
    start = time.perf_counter()
    out = Path(out)
    max_bytes = parse_size(max_shard_size, ConversionError)
    if out.exists() and not force:
        raise ConversionError(f"{out}: output already exists (pass --force to replace it)")
    plan = plan_gguf_conversion(gguf_path, dtype)
    tokenizer = build_tokenizer(plan.path) if plan.has_tokenizer else None
    need = sum(int(t.n_elements) for t, _ in plan.tensors) * DTYPES[dtype].itemsize
    with cleanup_on_failure(out, need_bytes=need):
        tmp = prepare_output(out, force)
        writer = ShardWriter(tmp, "part", max_bytes)
        for name, tensor in iter_hf_tensors(plan, dtype):
            writer.add(name, tensor)
        writer.flush()
        name_shards(tmp, writer.written)
        cfg = plan.config
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp, str(plan.path))
        provenance = {
            "converted_from": str(plan.path.resolve()),
            "format": "gguf",
            "converter": "c2f_megatron.checkpoint.gguf",
            "general.name": metadata_value(plan.reader, "general.name"),
            "tensor_types": plan.tensor_types,
            "dtype": dtype,
            "tokenizer": tokenizer is not None,
        }
        (tmp / "c2f_provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        commit_output(tmp, out)
    return ConversionReport(out, time.perf_counter() - start)
