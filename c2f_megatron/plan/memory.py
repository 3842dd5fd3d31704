"""What a transformer keeps in memory, tensor by tensor: activations for the backward pass, the KV cache,
and the micro-batches a pipeline schedule holds at once. Plain arithmetic, no torch.

Activations follow Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer
Models", section 4: every tensor an operator saves for its backward pass, per layer, in bytes. Their
GPT layer (LayerNorm, GeLU MLP of 4h, unfused attention with dropout) comes out at their
``sbh(34 + 5as/h)``; the same inventory describes the layers we run (RMSNorm, SwiGLU, grouped-query
attention through a fused SDPA kernel, no dropout). Tensors inside the tensor-parallel region are split
over the ``t`` TP ranks; the rest (norm and linear inputs, dropout masks) are split only with sequence
parallelism. Selective recompute drops what core attention saves; full recompute keeps each layer's input
and rebuilds ``recompute_num_layers`` layers at a time in the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Attention = Literal["flash", "unfused"]
Recompute = Literal["selective", "full"] | None

GB = 1024**3  # the plan prints GiB, as nvidia-smi and torch.cuda do


@dataclass(frozen=True)
class LayerShape:
    """What one transformer layer's saved tensors depend on.

    ``attention``: ``flash`` is a fused kernel that keeps only its output and the log-sum-exp (torch SDPA's
    flash and memory-efficient kernels, TE's fused attention); ``unfused`` materialises the ``[b, a, s, s]``
    scores (megatron's local ``DotProductAttention``). ``output_copy``: a kernel whose output must be copied into
    the ``[s, b, h]`` layout the projection reads keeps both (torch SDPA's flash kernels return a
    ``[b, s, h, d]`` layout, which the SDPA spec reshapes as a view: no copy).
    ``mask_bias``: an explicit attention mask (PPO's padded rows) reaches the memory-efficient kernel as
    a ``[b, 1, s, s]`` additive bias that each layer keeps for its backward pass.
    """

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    gated: bool = True
    attention: Attention = "flash"
    attention_dropout: bool = False
    hidden_dropout: bool = False
    norm_stats: bool = True  # RMSNorm / LayerNorm keep fp32 per-token statistics
    output_copy: bool = False
    mask_bias: bool = False
    composite_norm: bool = True  # torch's RMSNorm outside a fused kernel also keeps the normalised input
    v_holds_qkv: bool = (
        True  # V is a view of the fused QKV output (Q, K are rotated copies): it keeps all of it
    )
    rope_tables: bool = True  # each layer keeps its cos / sin tables for Q and K
    glu_copy: bool = True  # megatron's GLU keeps ``up + glu_linear_offset``, a copy of the up half
    mask_type_tensor: bool = True  # selective recompute hands the mask type to the checkpoint as a tensor

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        # the unfused path expands the KV groups to every head before its matmuls, which save the copies
        return (self.heads if self.attention == "unfused" else self.kv_heads) * self.head_dim


def layer_activations(
    shape: LayerShape,
    seq: int,
    batch: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: Recompute = None,
    dtype_bytes: int = 2,
) -> dict[str, float]:
    """Bytes one layer keeps for its backward pass for one micro-batch of ``batch`` x ``seq`` tokens, by
    tensor. With full recompute only the layer input stays (``full_recompute_working_set`` adds the
    layers rebuilt during the backward pass)."""
    s, b, h, d = seq, batch, shape.hidden, dtype_bytes
    rep = tp if sequence_parallel else 1  # the split of the tensors outside the TP region
    tokens = s * b
    if recompute == "full":
        return {"layer input": tokens * h * d / rep}
    out: dict[str, float] = {
        "input norm input": tokens * h * d / rep,
        "qkv input": tokens * h * d / rep,
        "mlp norm input": tokens * h * d / rep,
        "fc1 input": tokens * h * d / rep,
    }
    if shape.composite_norm:
        out["normalised norm inputs"] = 2 * tokens * h * d / rep
    if shape.norm_stats:
        out["norm statistics"] = 2 * tokens * 4 / rep
    if shape.hidden_dropout:
        out["dropout masks"] = 2 * tokens * h / rep  # one byte per element, after attention and MLP
    out["q"] = tokens * shape.q_width * d / tp
    out["k"] = tokens * shape.kv_width * d / tp
    if shape.v_holds_qkv:
        out["qkv output (held by v)"] = tokens * (shape.q_width + 2 * shape.kv_width) * d / tp
    else:
        out["v"] = tokens * shape.kv_width * d / tp
    if shape.rope_tables:
        out["rope tables"] = 4 * s * shape.head_dim * d
    if recompute == "selective":
        if shape.mask_type_tensor:
            out["checkpointed mask type"] = 4  # an int32 [1]
    else:  # what core attention saves beyond its inputs q, k, v
        if shape.attention == "flash":
            if shape.output_copy:  # else the kernel's output is the projection input below
                out["attention kernel output"] = tokens * shape.q_width * d / tp
            out["attention log-sum-exp"] = tokens * shape.heads * 4 / tp
            if shape.mask_bias:
                out["attention mask bias"] = b * s * s * d
        else:
            scores = b * shape.heads * s * s / tp
            out["softmax output"] = scores * d
            if shape.attention_dropout:
                out["attention dropout mask"] = scores
                out["attention dropout output"] = scores * d
    out["projection input"] = tokens * shape.q_width * d / tp
    fc1_out = 2 * shape.ffn if shape.gated else shape.ffn
    out["fc1 output"] = tokens * fc1_out * d / tp
    if shape.gated:
        out["activation output"] = tokens * shape.ffn * d / tp  # silu(gate), kept by the product
        if shape.glu_copy:
            out["up copy"] = tokens * shape.ffn * d / tp
    out["fc2 input"] = tokens * shape.ffn * d / tp
    return out


def full_recompute_working_set(
    shape: LayerShape,
    seq: int,
    batch: int,
    tp: int,
    sequence_parallel: bool,
    group: int,
    dtype_bytes: int = 2,
) -> float:
    """Bytes of the ``group`` layers that full recompute rebuilds at once during the backward pass."""
    one = sum(layer_activations(shape, seq, batch, tp, sequence_parallel, None, dtype_bytes).values())
    return group * one


def stage_activations(
    shape: LayerShape,
    layers: int,
    seq: int,
    batch: int,
    tp: int,
    sequence_parallel: bool,
    recompute: Recompute,
    recompute_method: str = "uniform",
    recompute_num_layers: int = 1,
    dtype_bytes: int = 2,
) -> float:
    """Bytes ``layers`` layers of one stage keep for one micro-batch, including full recompute's working
    set (``block``: the first ``recompute_num_layers`` layers are recomputed, the rest store everything)."""
    per = lambda r: sum(layer_activations(shape, seq, batch, tp, sequence_parallel, r, dtype_bytes).values())  # noqa: E731
    if recompute != "full":
        return layers * per(recompute)
    if recompute_method == "block":
        n = min(recompute_num_layers, layers)
        extra = (
            full_recompute_working_set(shape, seq, batch, tp, sequence_parallel, 1, dtype_bytes) if n else 0
        )
        return n * per("full") + (layers - n) * per(None) + extra
    group = min(recompute_num_layers, layers)
    groups = -(-layers // group)
    working = full_recompute_working_set(shape, seq, batch, tp, sequence_parallel, group, dtype_bytes)
    return groups * per("full") + working


def logits_bytes(seq: int, batch: int, padded_vocab: int, tp: int, dtype_bytes: int = 2) -> float:
    """The vocab-parallel logits of one micro-batch and what the loss keeps: the model's output, its fp32
    copy and the fp32 softmax the cross-entropy backward reads."""
    return seq * batch * padded_vocab / tp * (dtype_bytes + 8)


def kv_cache_bytes(
    layers: int, kv_heads: int, head_dim: int, tp: int, batch: int, max_tokens: int, dtype_bytes: int = 2
) -> float:
    """The generation KV cache (``generation.decode.KVDecoder``): a key and a value buffer per layer of
    ``[batch, kv_heads / tp, max_tokens, head_dim]``."""
    return 2 * layers * max_tokens * batch * (kv_heads // tp) * head_dim * dtype_bytes


def micro_batches_in_flight(pp: int, pp_rank: int, num_micro_batches: int, vpp: int | None = None) -> float:
    """Micro-batches whose activations a pipeline stage holds at the peak of megatron's schedules, in
    units of the stage's whole layer set: 1F1B holds ``pp - rank`` (capped by the micro-batch count); the
    interleaved schedule holds ``(pp - rank - 1) * 2 + (vpp - 1) * pp + 1`` model chunks of
    ``1 / vpp`` of the stage each (megatron's warm-up count)."""
    if pp == 1:
        return 1.0
    if not vpp or vpp == 1:
        return float(min(num_micro_batches, pp - pp_rank))
    chunks = min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, num_micro_batches * vpp)
    return chunks / vpp


def gib(n: float) -> float:
    return n / GB
