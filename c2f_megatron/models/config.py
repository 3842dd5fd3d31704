"""Typed model configuration, the presets, and their translation to megatron ``TransformerConfig``.

One ``ModelConfig`` describes every decoder of the Llama family that megatron's ``GPTModel`` expresses
exactly: RMSNorm, SwiGLU, RoPE (plain, or Llama-3.x scaled), grouped-query attention, no biases, tied or
untied input/output embeddings, an explicit head dimension, and an optional sliding window (Mistral v0.1).
``family`` says which Hugging Face class the weights come from and go back to (``MistralForCausalLM`` or
``LlamaForCausalLM``: same tensors, different config files).

``ModelConfig`` speaks Hugging Face's vocabulary where the two differ (``sliding_window`` is HF's W) so that
converters and presets can be checked against the HF configs field by field; ``to_transformer_config`` and
``gpt_model_kwargs`` are the one place that translates (HF ``sliding_window=W`` is megatron
``window_size=(W-1, 0)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

LayerSpecName = Literal["auto", "te", "sdpa", "local"]
DTypeName = Literal["fp32", "bf16", "fp16"]
FamilyName = Literal["mistral", "llama"]
FAMILIES = ("mistral", "llama")

# The parameter dtypes by name. ``DTYPES`` maps them to torch dtypes and imports torch on first use (module
# ``__getattr__``), so that code which only needs the names (the converters' command line) stays torch-free.
DTYPE_NAMES = ("bf16", "fp16", "fp32")
DTYPE_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes per element
_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def __getattr__(name: str) -> Any:
    if name == "DTYPES":
        import torch

        return {k: getattr(torch, v) for k, v in _TORCH_DTYPE.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ModelConfig fields a run may choose when it loads a checkpoint: kernels and regularisation, not the
# architecture (a checkpoint trained with one layer spec loads and merges with another's).
RUNTIME_FIELDS = ("layer_spec", "attention_dropout", "hidden_dropout")


@dataclass
class ModelConfig:
    """Architecture of a Llama-family decoder (RMSNorm, SwiGLU, RoPE, GQA, no biases).

    ``kv_channels``: the head dimension when it is not ``hidden_size / num_attention_heads`` (HF
    ``head_dim``); ``rope_scaling_factor``: Llama-3.x RoPE scaling (HF ``rope_type: llama3`` with
    low/high frequency factors 1/4 over 8192 original positions, what megatron implements); null: plain RoPE.
    """

    family: FamilyName = "mistral"
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 384
    vocab_size: int = 32000
    max_position_embeddings: int = 512
    rotary_base: float = 10000.0
    rope_scaling_factor: float | None = None
    kv_channels: int | None = None
    sliding_window: int | None = None  # HF semantics: a token sees itself and the W-1 before it
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    make_vocab_size_divisible_by: int = 128
    params_dtype: DTypeName = "fp32"
    layer_spec: LayerSpecName = "auto"
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {list(FAMILIES)}, got {self.family!r}")
        sizes = (
            "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
            "vocab_size", "max_position_embeddings", "make_vocab_size_divisible_by",
        )  # fmt: skip
        problems += [f"{n} must be >= 1, got {getattr(self, n)}" for n in sizes if getattr(self, n) < 1]
        if problems:  # the divisibility checks below need positive sizes
            raise ValueError("invalid model config: " + "; ".join(problems))
        for name in ("rotary_base", "norm_epsilon", "init_method_std"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} not divisible by num_attention_heads")
        if self.kv_channels is not None and self.kv_channels < 1:
            problems.append(f"kv_channels must be >= 1 or null, got {self.kv_channels}")
        if self.rope_scaling_factor is not None and self.rope_scaling_factor <= 0:
            problems.append(f"rope_scaling_factor must be > 0 or null, got {self.rope_scaling_factor}")
        if self.num_attention_heads % self.num_query_groups:
            problems.append(
                f"num_attention_heads {self.num_attention_heads} not divisible by num_query_groups "
                f"{self.num_query_groups}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            problems.append(f"sliding_window must be >= 1 or null, got {self.sliding_window}")
        if self.sliding_window is not None and self.family == "llama":
            problems.append("sliding_window must be null for family 'llama' (LlamaForCausalLM has none)")
        if self.params_dtype not in DTYPE_NAMES:
            problems.append(f"params_dtype must be one of {sorted(DTYPE_NAMES)}, got {self.params_dtype!r}")
        if self.layer_spec not in ("auto", "te", "sdpa", "local"):
            problems.append(f"layer_spec must be auto|te|sdpa|local, got {self.layer_spec!r}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def tied_embeddings(self) -> bool:
        return not self.untie_embeddings_and_output_weights

    @property
    def window_size(self) -> tuple[int, int] | None:
        """megatron's (left, right) window for HF's ``sliding_window``: W tokens incl. itself = (W-1, 0)."""
        return None if self.sliding_window is None else (self.sliding_window - 1, 0)

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocab rounded up to a multiple of ``make_vocab_size_divisible_by * TP`` (Megatron-LM's rule)."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def num_parameters(self) -> int:
        """Parameter count without vocab padding (matches HF ``MistralForCausalLM``/``LlamaForCausalLM``)."""
        h, q, kv = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.num_query_groups * self.head_dim,
        )
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.ffn_hidden_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (2 if self.untie_embeddings_and_output_weights else 1)
        return self.num_layers * per_layer + emb + h

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def to_transformer_config(
    model: ModelConfig,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    **overrides: Any,
):
    """The megatron ``TransformerConfig`` of a Mistral model at a given parallel layout."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from c2f_megatron.platform.distributed import use_cuda

    dtype = getattr(torch, _TORCH_DTYPE[model.params_dtype])
    if model.num_layers % pipeline_model_parallel_size:
        raise ValueError(
            f"pipeline_model_parallel_size {pipeline_model_parallel_size} does not divide num_layers "
            f"{model.num_layers}"
        )
    for what, n in (
        ("num_attention_heads", model.num_attention_heads),
        ("num_query_groups", model.num_query_groups),
    ):
        if n % tensor_model_parallel_size:
            raise ValueError(
                f"tensor_model_parallel_size {tensor_model_parallel_size} does not divide {what} {n}"
            )
    cuda = use_cuda()
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        window_size=model.window_size,
        init_method_std=model.init_method_std,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        pipeline_dtype=dtype,
        use_cpu_initialization=not cuda,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        # gloo + batched isend/irecv corrupted interleaved-schedule activations from the third micro-batch
        # on (measured: tests/test_parallel_parity.py pp2xvpp2); plain isend/irecv is exact on CPU.
        batch_p2p_comm=cuda,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def gpt_model_kwargs(model: ModelConfig) -> dict[str, Any]:
    """The ``GPTModel`` arguments that come from the architecture (the rest is layout and spec)."""
    return dict(
        max_sequence_length=model.max_position_embeddings,
        share_embeddings_and_output_weights=model.tied_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=model.rotary_base,
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 8.0,
    )


def _mistral(**kw: Any) -> ModelConfig:
    base = dict(
        hidden_size=4096,
        num_layers=32,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=14336,
        vocab_size=32000,
        max_position_embeddings=32768,
        norm_epsilon=1e-5,
        rotary_base=10000.0,
        sliding_window=4096,
        params_dtype="bf16",
    )
    base.update(kw)
    return ModelConfig(**base)


def _llama3_8b(**kw: Any) -> ModelConfig:
    base = dict(
        family="llama",
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rotary_base=500000.0,
        params_dtype="bf16",
    )
    base.update(kw)
    return ModelConfig(**base)


# The 7B presets match the HF configs of mistralai/Mistral-7B-v0.1 / -Instruct-v0.2 / -v0.3.
PRESETS: dict[str, ModelConfig] = {
    "mistral-7b-v0.1": _mistral(),
    "mistral-7b-v0.2": _mistral(rotary_base=1e6, sliding_window=None),
    "mistral-7b-v0.3": _mistral(rotary_base=1e6, sliding_window=None, vocab_size=32768),
    # Same shape family, scaled down: for single GPUs, CPU runs and tests.
    "mistral-1b": _mistral(
        num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=4, ffn_hidden_size=5632
    ),
    "mistral-160m": _mistral(
        num_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        num_query_groups=4,
        ffn_hidden_size=2048,
        max_position_embeddings=4096,
        sliding_window=None,
        params_dtype="fp32",
    ),
    "mistral-tiny": ModelConfig(
        num_layers=4,
        hidden_size=256,
        num_attention_heads=8,
        num_query_groups=2,
        ffn_hidden_size=768,
        vocab_size=32000,
        max_position_embeddings=1024,
        params_dtype="fp32",
    ),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): Llama, tied embeddings, 9 heads / 3 KV groups (ships as GGUF).
    "smollm2-135m": ModelConfig(
        family="llama",
        num_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_query_groups=3,
        ffn_hidden_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        rotary_base=100000.0,
        norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=False,
        params_dtype="bf16",
    ),
    # meta-llama/Meta-Llama-3-8B(-Instruct) and Llama-3.1-8B (RoPE scaled by 8).
    "llama-3-8b": _llama3_8b(),
    "llama-3.1-8b": _llama3_8b(max_position_embeddings=131072, rope_scaling_factor=8.0),
    "mistral-nano": ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=192,
        vocab_size=32000,
        max_position_embeddings=512,
        params_dtype="fp32",
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A copy of a preset with field overrides; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)} in overrides for preset {name!r}")
    return dataclasses.replace(PRESETS[name], **overrides)
