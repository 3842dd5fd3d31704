"""Hugging Face Llama-family <-> megatron-core layout: config translation, tensor names and layouts.

``MistralForCausalLM`` and ``LlamaForCausalLM`` (Mistral 7B v0.1-v0.3, Zephyr, Llama 2/3/3.x, SmolLM2, ...)
share every tensor name and layout; they differ only in their config files (Mistral's sliding window).
Pure functions only (no I/O, no distributed state) so each layout fact is unit-tested against a slow
reference; the module imports no torch (the tensor functions do, when called). The facts converters get wrong most often, and how megatron lays them out:

- fused QKV is grouped per query group: ``[q heads of group g; k_g; v_g] for g in groups``; a TP rank holds
  the contiguous block of its groups, so the global tensor is the concatenation of the rank shards;
- ``linear_fc1`` is ``[gate; up]`` globally (megatron's swiglu sharded factory stores the two halves at
  separate offsets) while each TP rank holds ``[gate_r; up_r]``;
- the vocab is padded to a multiple of ``make_vocab_size_divisible_by * TP`` with zero rows, trimmed again
  on export;
- tied embeddings (``tie_word_embeddings``): HF has no ``lm_head.weight``; megatron has no output layer
  on a single stage, and with PP > 1 the last stage holds a copy of the embedding (``output_layer.weight``,
  filled from ``model.embed_tokens.weight``, never exported);
- the TE spec fuses the norms into ``linear_qkv.layer_norm_weight`` and ``linear_fc1.layer_norm_weight``;
- HF ``sliding_window=W`` is megatron ``window_size=(W-1, 0)`` (``ModelConfig.window_size`` does that).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from c2f_megatron.checkpoint import CheckpointError
from c2f_megatron.models.config import DTYPE_NAMES, ModelConfig

if TYPE_CHECKING:
    from torch import Tensor

# family -> (architecture, model_type) of the HF config
HF_CLASSES = {"mistral": ("MistralForCausalLM", "mistral"), "llama": ("LlamaForCausalLM", "llama")}
HF_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MEGATRON_TO_HF_DTYPE = {v: k for k, v in HF_DTYPE_NAMES.items()}
# The Llama-3.x RoPE scaling megatron implements (RotaryEmbedding._apply_scaling): only its factor varies.
LLAMA3_ROPE_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# How a tensor is split over tensor-parallel ranks (and, for fused ones, how HF tensors combine).
Kind = Literal["replicated", "column", "row", "qkv", "fc1", "vocab"]


class ConversionError(CheckpointError):
    """An input the converter refuses, with the file and the field or tensor named."""


# ---------------------------------------------------------------------------------------------- config


def model_config_from_hf(hf: dict[str, Any], source: str, params_dtype: str | None = None) -> ModelConfig:
    """``ModelConfig`` of an HF ``config.json`` dict (Mistral or Llama); what megatron's ``GPTModel`` cannot
    express exactly (biases, other activations, rope types, ...) is refused naming the field.

    ``source`` names the file in errors. ``params_dtype`` (fp32/bf16/fp16) defaults to the HF dtype.
    """

    def fail(field: str, problem: str) -> ConversionError:
        return ConversionError(f"{source}: field '{field}' {problem}")

    archs = hf.get("architectures")
    families = {arch: (family, model_type) for family, (arch, model_type) in HF_CLASSES.items()}
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in families:
        raise fail("architectures", f"is {archs!r}; supported: one of {sorted(families)}")
    family, model_type = families[archs[0]]
    if hf.get("model_type") != model_type:
        raise fail("model_type", f"is {hf.get('model_type')!r}; {archs[0]} has {model_type!r}")
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        if not isinstance(hf.get(field), int) or hf[field] < 1:
            raise fail(field, f"must be a positive integer, got {hf.get(field)!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise fail("hidden_act", f"is {hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise fail(field, "is true; megatron's Llama layers here have no biases")
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise fail("pretraining_tp", f"is {hf['pretraining_tp']!r}; only 1 is supported")
    tied = hf.get("tie_word_embeddings", family == "llama")  # the HF classes' own defaults
    if not isinstance(tied, bool):
        raise fail("tie_word_embeddings", f"must be true or false, got {tied!r}")
    heads = hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    if not isinstance(groups, int) or heads % groups:
        raise fail("num_key_value_heads", f"{groups!r} does not divide num_attention_heads {heads}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
        raise fail("head_dim", f"must be a positive integer or null, got {head_dim!r}")
    if head_dim is None and hf["hidden_size"] % heads:
        raise fail("hidden_size", f"{hf['hidden_size']} is not divisible by num_attention_heads {heads}")
    implied = hf["hidden_size"] // heads if hf["hidden_size"] % heads == 0 else None
    rope_theta, rope_factor = _rope(hf, fail)
    window = hf.get("sliding_window") if family == "mistral" else None
    if family == "llama" and hf.get("sliding_window") is not None:
        raise fail("sliding_window", "is set; LlamaForCausalLM has no sliding window")
    if hf.get("use_sliding_window") is False:
        window = None
    if window is not None and (not isinstance(window, int) or window < 1):
        raise fail("sliding_window", f"must be a positive integer or null, got {window!r}")
    if params_dtype is None:
        hf_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        if hf_dtype not in HF_DTYPE_NAMES:
            raise fail("torch_dtype", f"is {hf_dtype!r}; expected one of {sorted(HF_DTYPE_NAMES)}")
        params_dtype = HF_DTYPE_NAMES[hf_dtype]
    if params_dtype not in DTYPE_NAMES:
        raise ConversionError(f"dtype {params_dtype!r} is not one of {sorted(DTYPE_NAMES)}")
    return ModelConfig(
        family=family,  # type: ignore[arg-type]
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        rotary_base=float(rope_theta),
        rope_scaling_factor=rope_factor,
        kv_channels=None if head_dim in (None, implied) else head_dim,
        sliding_window=window,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        untie_embeddings_and_output_weights=not tied,
        params_dtype=params_dtype,  # type: ignore[arg-type]
        layer_spec="auto",
    )


def _rope(hf: dict[str, Any], fail) -> tuple[float, float | None]:
    """RoPE base and Llama-3 scaling factor (None: plain RoPE) from transformers 4 (``rope_theta`` /
    ``rope_scaling``) or 5 (``rope_parameters``); other rope types are refused."""
    params = hf.get("rope_parameters")
    field = "rope_parameters"
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], params
    else:
        theta, scaling, field = hf.get("rope_theta", 10000.0), hf.get("rope_scaling"), "rope_scaling"
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise fail("rope_theta", f"must be a positive number, got {theta!r}")
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise fail(field, f"must be null or an object, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise fail(field, f"rope type {rope_type!r} is not supported (plain RoPE or 'llama3' only)")
    for key, value in LLAMA3_ROPE_FIXED.items():
        if float(scaling.get(key, -1)) != value:
            raise fail(
                field,
                f"llama3 {key} is {scaling.get(key)!r}; megatron implements only {value:g} "
                f"({', '.join(f'{k}={v:g}' for k, v in LLAMA3_ROPE_FIXED.items())})",
            )
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise fail(field, f"llama3 factor must be a positive number, got {factor!r}")
    return float(theta), float(factor)


def hf_config_from_model(
    cfg: ModelConfig, dtype: str, tokenizer: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The HF ``config.json`` of ``cfg`` (``MistralForCausalLM`` or ``LlamaForCausalLM``); transformers 4
    and 5 read it. Token ids come from the checkpoint's recorded ``tokenizer`` info when there is one."""
    arch, model_type = HF_CLASSES[cfg.family]
    tok = tokenizer or {}
    rope: dict[str, Any] = {"rope_theta": cfg.rotary_base, "rope_type": "default"}
    if cfg.rope_scaling_factor is not None:
        rope = {
            "rope_theta": cfg.rotary_base,
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            **LLAMA3_ROPE_FIXED,
        }
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_method_std,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "rope_parameters": rope,
        "attention_dropout": cfg.attention_dropout,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tied_embeddings,
        "use_cache": True,
        "bos_token_id": tok.get("bos_id", 1),
        "eos_token_id": tok.get("eos_id", 2),
        "torch_dtype": MEGATRON_TO_HF_DTYPE[dtype],
        "dtype": MEGATRON_TO_HF_DTYPE[dtype],
    }
    if cfg.rope_scaling_factor is not None:
        out["rope_scaling"] = rope
    if "pad_id" in tok:
        out["pad_token_id"] = tok["pad_id"]
    if cfg.family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out


# ----------------------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class TensorRule:
    """One megatron parameter and the HF tensor(s) it is made of (names inside a layer, or the model)."""

    megatron: str
    hf: tuple[str, ...]
    kind: Kind


def layer_rules(layer_spec: str) -> list[TensorRule]:
    """Per-layer rules for the local/sdpa spec or the TE spec (norms fused into the linear layers)."""
    if layer_spec == "te":
        norm_in, norm_mlp = "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    elif layer_spec in ("local", "sdpa"):
        norm_in, norm_mlp = "input_layernorm.weight", "pre_mlp_layernorm.weight"
    else:
        raise ValueError(f"layer_spec must be 'local', 'sdpa' or 'te', got {layer_spec!r}")
    return [
        TensorRule(norm_in, ("input_layernorm.weight",), "replicated"),
        TensorRule(
            "self_attention.linear_qkv.weight",
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            "qkv",
        ),
        TensorRule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "row"),
        TensorRule(norm_mlp, ("post_attention_layernorm.weight",), "replicated"),
        TensorRule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1"),
        TensorRule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "row"),
    ]


EMBEDDING = TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")
FINAL_NORM = TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated")
LM_HEAD = TensorRule("output_layer.weight", ("lm_head.weight",), "vocab")
# A tied model's last pipeline stage holds a copy of the embedding as its output layer.
TIED_HEAD = TensorRule("output_layer.weight", ("model.embed_tokens.weight",), "vocab")


def model_rules(tied: bool) -> list[TensorRule]:
    """The rules of the parameters outside the layers."""
    return [EMBEDDING, FINAL_NORM, TIED_HEAD if tied else LM_HEAD]


_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def hf_layer_name(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


def rule_for(megatron_name: str, layer_spec: str, tied: bool = False) -> tuple[TensorRule, int | None]:
    """The rule of a megatron parameter name and its *local* layer index (None outside the layers).

    Raises ``KeyError`` naming the parameter when it has no HF counterpart.
    """
    match = _LAYER_NAME.match(megatron_name)
    if match:
        local, suffix = int(match.group(1)), match.group(2)
        for rule in layer_rules(layer_spec):
            if rule.megatron == suffix:
                return rule, local
    else:
        for rule in model_rules(tied):
            if rule.megatron == megatron_name:
                return rule, None
    raise KeyError(
        f"megatron parameter {megatron_name!r} has no Hugging Face Llama-family counterpart ({layer_spec} spec)"
    )


def hf_names_of(rule: TensorRule, layer: int | None) -> list[str]:
    return list(rule.hf) if layer is None else [hf_layer_name(layer, n) for n in rule.hf]


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF model with its shape, in HF's own order (no ``lm_head`` when tied)."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        for name, shape in (
            ("input_layernorm.weight", (h,)),
            ("self_attn.q_proj.weight", (q, h)),
            ("self_attn.k_proj.weight", (kv, h)),
            ("self_attn.v_proj.weight", (kv, h)),
            ("self_attn.o_proj.weight", (h, q)),
            ("post_attention_layernorm.weight", (h,)),
            ("mlp.gate_proj.weight", (f, h)),
            ("mlp.up_proj.weight", (f, h)),
            ("mlp.down_proj.weight", (h, f)),
        ):
            shapes[hf_layer_name(i, name)] = shape
    shapes["model.norm.weight"] = (h,)
    if not cfg.tied_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def detect_layer_spec(megatron_names: list[str]) -> str:
    """``te`` when norms are fused into the linear layers (TE spec), else ``local``."""
    return "te" if any(n.endswith(".layer_norm_weight") for n in megatron_names) else "local"


# --------------------------------------------------------------------------------------------- layouts


def tp_range(total: int, tp: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s equal share of ``total`` rows; ``tp`` must divide ``total``."""
    if total % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide {total}")
    per = total // tp
    return rank * per, (rank + 1) * per


def qkv_to_megatron(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int) -> Tensor:
    """Fused megatron QKV from HF q/k/v rows (global, or one TP rank's heads and groups).

    Result rows: for each group g, its ``num_heads/num_groups`` query heads, then k_g, then v_g.
    """
    import torch

    d = q.shape[0] // num_heads
    hidden = q.shape[1:]
    per = num_heads // num_groups
    q = q.reshape(num_groups, per * d, *hidden)
    k = k.reshape(num_groups, d, *hidden)
    v = v.reshape(num_groups, d, *hidden)
    return torch.cat([q, k, v], dim=1).reshape(num_groups * (per + 2) * d, *hidden)


def qkv_from_megatron(qkv: Tensor, num_heads: int, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """HF q, k, v (contiguous, new tensors) from a fused megatron QKV; inverse of ``qkv_to_megatron``."""
    import torch

    per = num_heads // num_groups
    d = qkv.shape[0] // (num_groups * (per + 2))
    grouped = qkv.reshape(num_groups, (per + 2) * d, *qkv.shape[1:])
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]).contiguous() for t in (q, k, v))  # type: ignore[return-value]


def fc1_to_megatron(gate: Tensor, up: Tensor) -> Tensor:
    """megatron ``linear_fc1`` = ``[gate; up]`` (global, or one rank's ``[gate_r; up_r]``)."""
    import torch

    return torch.cat([gate, up], dim=0)


def fc1_from_megatron(fc1: Tensor) -> tuple[Tensor, Tensor]:
    """``(gate, up)`` views of a ``[gate; up]`` fc1."""
    import torch

    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def fc1_from_tp_shards(shards: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Global ``(gate, up)`` from the TP ranks' ``[gate_r; up_r]`` shards (in rank order)."""
    import torch

    halves = [fc1_from_megatron(s) for s in shards]
    return torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])


def pad_vocab(weight: Tensor, padded_rows: int) -> Tensor:
    """Append zero rows up to ``padded_rows`` (megatron pads the vocab for TP divisibility)."""
    import torch

    extra = padded_rows - weight.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad a vocab of {weight.shape[0]} rows down to {padded_rows}")
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])])


def trim_vocab(weight: Tensor, vocab_size: int) -> Tensor:
    """The first ``vocab_size`` rows (a view): padding rows are dropped on export."""
    if weight.shape[0] < vocab_size:
        raise ValueError(f"embedding has {weight.shape[0]} rows, fewer than the vocab size {vocab_size}")
    return weight[:vocab_size]


def vocab_rows_for_rank(vocab_size: int, padded: int, tp: int, rank: int) -> tuple[int, int, int]:
    """For a rank's slice of the padded vocab: (first HF row, HF rows to copy, zero rows after them)."""
    start, stop = tp_range(padded, tp, rank)
    real_stop = min(stop, vocab_size)
    real = max(real_stop - start, 0)
    return min(start, vocab_size), real, (stop - start) - real


# ------------------------------------------------------------------------------ distributed-checkpoint plan
#
# The streaming converters write and read megatron's ``torch_dist`` files directly. On disk every layer
# tensor is one global tensor ``decoder.layers.<TE name>`` with the layer as its first dimension (the local
# spec maps its norm names onto the TE ones when it saves), and ``linear_fc1`` is ``[gate; up]`` along
# its rows. A plan is a list of chunks, each a box of a global tensor filled by contiguous element ranges
# of HF tensors: the same plan is read forwards (HF -> megatron) and backwards (megatron -> HF).

LAYER_KEY_PREFIX = "decoder.layers."
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


@dataclass(frozen=True)
class Piece:
    """Elements ``src:src+n`` of HF tensor ``hf`` are elements ``dst:dst+n`` of a chunk (row-major)."""

    hf: str
    src: int
    n: int
    dst: int


@dataclass(frozen=True)
class DistChunk:
    """A box of a global megatron tensor (``offsets``/``sizes``) and the HF ranges that fill it (rows of a
    vocab chunk that no piece covers are padding zeros)."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def dist_shapes(cfg: ModelConfig, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """The global shape of every tensor megatron's ``GPTModel.sharded_state_dict`` saves."""
    h, d, f, n = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size, cfg.num_layers
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (padded_vocab, h)}
    layer = {
        "self_attention.linear_qkv.layer_norm_weight": (h,),
        "self_attention.linear_qkv.weight": (q + 2 * kv, h),
        "self_attention.linear_proj.weight": (h, q),
        "mlp.linear_fc1.layer_norm_weight": (h,),
        "mlp.linear_fc1.weight": (2 * f, h),
        "mlp.linear_fc2.weight": (h, f),
    }
    shapes.update({LAYER_KEY_PREFIX + k: (n, *v) for k, v in layer.items()})
    shapes["decoder.final_layernorm.weight"] = (h,)
    if not cfg.tied_embeddings:
        shapes["output_layer.weight"] = (padded_vocab, h)
    return shapes


def extra_state_keys(layer: int, num_layers: int) -> list[str]:
    """The ShardedObject keys megatron saves for one layer's linear modules (their ``_extra_state``)."""
    return [f"{LAYER_KEY_PREFIX}{m}._extra_state/shard_{layer}_{num_layers}" for m in EXTRA_STATE_MODULES]


def _whole(key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], hf: str) -> DistChunk:
    n = 1
    for s in sizes:
        n *= s
    return DistChunk(key, offsets, sizes, (Piece(hf, 0, n, 0),))


def dist_layer_chunks(cfg: ModelConfig, layer: int) -> list[DistChunk]:
    """One layer's chunks: fused QKV interleaved per query group, fc1 as its gate and up halves."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    groups, per = cfg.num_query_groups, cfg.num_attention_heads // cfg.num_query_groups
    q, kv = cfg.num_attention_heads * d, groups * d
    name = lambda n: hf_layer_name(layer, n)  # noqa: E731
    key = lambda k: LAYER_KEY_PREFIX + k  # noqa: E731
    qkv: list[Piece] = []
    for g in range(groups):
        base = g * (per + 2) * d * h
        qkv.append(Piece(name("self_attn.q_proj.weight"), g * per * d * h, per * d * h, base))
        qkv.append(Piece(name("self_attn.k_proj.weight"), g * d * h, d * h, base + per * d * h))
        qkv.append(Piece(name("self_attn.v_proj.weight"), g * d * h, d * h, base + (per + 1) * d * h))
    return [
        _whole(
            key("self_attention.linear_qkv.layer_norm_weight"),
            (layer, 0),
            (1, h),
            name("input_layernorm.weight"),
        ),
        DistChunk(key("self_attention.linear_qkv.weight"), (layer, 0, 0), (1, q + 2 * kv, h), tuple(qkv)),
        _whole(
            key("self_attention.linear_proj.weight"),
            (layer, 0, 0),
            (1, h, q),
            name("self_attn.o_proj.weight"),
        ),
        _whole(
            key("mlp.linear_fc1.layer_norm_weight"),
            (layer, 0),
            (1, h),
            name("post_attention_layernorm.weight"),
        ),
        _whole(key("mlp.linear_fc1.weight"), (layer, 0, 0), (1, f, h), name("mlp.gate_proj.weight")),
        _whole(key("mlp.linear_fc1.weight"), (layer, f, 0), (1, f, h), name("mlp.up_proj.weight")),
        _whole(key("mlp.linear_fc2.weight"), (layer, 0, 0), (1, h, f), name("mlp.down_proj.weight")),
    ]


def dist_units(cfg: ModelConfig, padded_vocab: int) -> list[list[DistChunk]]:
    """The whole model as units of work in HF order: the embedding, each layer, the final norm, the
    output layer (untied only). Vocab rows past ``vocab_size`` are left to the zero padding."""
    h, v = cfg.hidden_size, cfg.vocab_size

    def vocab(key: str, hf: str) -> DistChunk:
        return DistChunk(key, (0, 0), (padded_vocab, h), (Piece(hf, 0, v * h, 0),))

    units = [[vocab(EMBEDDING.megatron, EMBEDDING.hf[0])]]
    units += [dist_layer_chunks(cfg, i) for i in range(cfg.num_layers)]
    units.append([_whole(FINAL_NORM.megatron, (0,), (h,), FINAL_NORM.hf[0])])
    if not cfg.tied_embeddings:
        units.append([vocab(LM_HEAD.megatron, LM_HEAD.hf[0])])
    return units


@dataclass(frozen=True)
class RowSource:
    """HF rows ``dst:dst+n`` are rows ``row:row+n`` of global tensor ``key`` at ``layer`` (None: not a
    layer tensor), each tensor seen per layer as rows x cols (a vector is one row)."""

    key: str
    layer: int | None
    row: int
    n: int
    dst: int


def per_layer_matrix(key: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of one layer's slice of a global tensor (the tensor itself outside the layers)."""
    inner = shape[1:] if key.startswith(LAYER_KEY_PREFIX) else shape
    return (1, inner[0]) if len(inner) == 1 else (inner[0], inner[1])


def hf_row_sources(cfg: ModelConfig, padded_vocab: int) -> dict[str, list[RowSource]]:
    """Where each HF tensor's rows lie in the global megatron tensors: the plan of ``dist_units`` read
    backwards (every piece is whole rows)."""
    shapes = dist_shapes(cfg, padded_vocab)
    hf_cols = {
        name: (shape[1] if len(shape) == 2 else shape[0]) for name, shape in expected_hf_shapes(cfg).items()
    }
    out: dict[str, list[RowSource]] = {}
    for unit in dist_units(cfg, padded_vocab):
        for chunk in unit:
            layered = chunk.key.startswith(LAYER_KEY_PREFIX)
            _, cols = per_layer_matrix(chunk.key, shapes[chunk.key])
            inner = chunk.offsets[1:] if layered else chunk.offsets
            row0 = inner[0] if len(inner) == 2 else 0
            for p in chunk.pieces:
                if p.n % cols or p.dst % cols or p.src % hf_cols[p.hf]:
                    raise ValueError(f"internal: piece {p} of {chunk.key} is not whole rows")
                layer = chunk.offsets[0] if layered else None
                out.setdefault(p.hf, []).append(
                    RowSource(chunk.key, layer, row0 + p.dst // cols, p.n // cols, p.src // hf_cols[p.hf])
                )
    return out
