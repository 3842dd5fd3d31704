"""Layer specs chosen at run time: Transformer Engine, torch-native SDPA, or megatron-core's local spec.

``auto`` prefers TE (fused kernels, required for fp8) when ``transformer_engine`` imports, else the SDPA
spec (megatron-core's local modules with core attention done by
``torch.nn.functional.scaled_dot_product_attention``: flash / memory-efficient kernels on GPUs without TE,
no [b, h, s, s] score buffer on CPU), else the plain local spec. All three build the same parameters with
the same names except TE, which fuses the norms into ``linear_qkv`` / ``linear_fc1`` (the converters know).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from c2f_megatron.models.config import LayerSpecName


def transformer_engine_available() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install (no CUDA, ABI mismatch) must not take the run down
        return False
    return True


def resolve_layer_spec(name: LayerSpecName) -> str:
    """The concrete spec for a config value: ``auto`` becomes ``te`` or ``sdpa``."""
    if name == "auto":
        return "te" if transformer_engine_available() else "sdpa"
    if name == "te" and not transformer_engine_available():
        raise RuntimeError("layer_spec 'te' requested but transformer_engine does not import here")
    if name not in ("te", "sdpa", "local"):
        raise ValueError(f"unknown layer_spec {name!r}: use auto, te, sdpa or local")
    return name


_SPEC_KERNELS = {
    "te": "Transformer Engine's fused attention, norms and linears",
    "sdpa": "megatron-core's local modules, torch scaled_dot_product_attention, torch RMSNorm",
    "local": "megatron-core's local modules, its unfused attention, torch RMSNorm",
}


def describe_layer_spec(name: LayerSpecName, resolved: str) -> str:
    """One line: the spec that runs, why, and what it computes with (instead of megatron's import-time
    "Transformer Engine / Apex not installed" warnings, which ``c2f_megatron/__init__.py`` silences)."""
    if name == "auto":
        why = "auto: Transformer Engine imports" if resolved == "te" else "auto: no Transformer Engine here"
    else:
        why = f"model.layer_spec={name}"
    apex = "" if importlib.util.find_spec("apex") is not None else "; no apex: torch optimizers"
    return f"layer spec: {resolved} ({why}): {_SPEC_KERNELS[resolved]}{apex}"


@functools.cache
def announce_layer_spec(name: LayerSpecName, resolved: str) -> None:
    """Print ``describe_layer_spec`` once per process (rank 0), however many models a job builds."""
    from c2f_megatron.platform.distributed import is_rank_zero

    if is_rank_zero():
        print(describe_layer_spec(name, resolved), flush=True)


@functools.cache
def _sdpa_attention_class():
    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import is_layer_window_attention

    class SDPADotProductAttention(DotProductAttention):
        """megatron's ``DotProductAttention`` with the score/softmax/context part done by torch SDPA.

        Same inputs and outputs ([s, b, heads, head_dim] in, [s, b, hidden/tp] out), same mask convention
        (boolean, True = masked). Unlike the local path, a sliding window is *combined* with an explicit
        (e.g. padding) mask instead of replacing it. Query rows that are masked entirely (left padding)
        attend to everything instead of producing NaN; their outputs are never read.
        """

        def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
            super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
            if config.softmax_type != "vanilla":
                raise ValueError("the SDPA layer spec supports only softmax_type='vanilla'")
            use_window = is_layer_window_attention(
                config.window_size, config.window_attn_skip_freq, layer_number
            )
            self.sdpa_window = config.window_size if use_window else None
            if config.apply_query_key_layer_scaling:
                self.softmax_scale *= self.layer_number  # coeff cancels without the scaled softmax

        def _mask(self, attention_mask: Optional[Tensor], sq: int, sk: int, device: torch.device):
            """Boolean 'may attend' mask broadcastable to [b, h, sq, sk], or None for plain causal."""
            blocked = None
            if attention_mask is not None:
                blocked = attention_mask.to(device=device, dtype=torch.bool)
            elif self.attn_mask_type == AttnMaskType.causal and (sq > 1 or self.sdpa_window is not None):
                if self.sdpa_window is None and sq == sk:
                    return None  # is_causal fast path
                blocked = _band_blocked(sq, sk, (sk, 0), device)  # bottom-right aligned causal
            if self.sdpa_window is not None:
                window = _band_blocked(sq, sk, self.sdpa_window, device)
                blocked = window if blocked is None else (blocked | window)
            if blocked is None:
                return None
            blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
            return ~blocked

        def forward(
            self,
            query: Tensor,
            key: Tensor,
            value: Tensor,
            attention_mask: Optional[Tensor],
            attn_mask_type=None,
            attention_bias: Optional[Tensor] = None,
            packed_seq_params=None,
        ) -> Tensor:
            if attention_bias is not None:
                raise ValueError("attention_bias is not supported by the SDPA spec")
            if packed_seq_params is not None:
                return self._packed(query, key, value, packed_seq_params)
            sq, b = query.shape[0], query.shape[1]
            sk = key.shape[0]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
            allowed = self._mask(attention_mask, sq, sk, q.device)
            is_causal = allowed is None and self.attn_mask_type == AttnMaskType.causal and sq > 1
            dropout_p = self.attention_dropout.p if self.training else 0.0
            gqa = q.shape[1] != k.shape[1]
            if sq == 1 and gqa and dropout_p == 0.0:
                # One query token (KV-cached decoding): a group's query heads become its query rows, so
                # SDPA reads each cached key/value head once instead of expanding it per query head (11x
                # less time per layer at 1100 cached tokens on CPU). The mask depends only on the key.
                groups, per_group = k.shape[1], q.shape[1] // k.shape[1]
                out = F.scaled_dot_product_attention(
                    q.reshape(b, groups, per_group, q.shape[-1]),
                    k,
                    v,
                    attn_mask=allowed,
                    scale=self.softmax_scale,
                )
                return out.reshape(1, b, self.hidden_size_per_partition)
            if dropout_p > 0 and not self.config.sequence_parallel:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    out = F.scaled_dot_product_attention(
                        q,
                        k,
                        v,
                        attn_mask=allowed,
                        dropout_p=dropout_p,
                        is_causal=is_causal,
                        scale=self.softmax_scale,
                        enable_gqa=gqa,
                    )
            else:
                out = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=allowed,
                    dropout_p=dropout_p,
                    is_causal=is_causal,
                    scale=self.softmax_scale,
                    enable_gqa=gqa,
                )
            return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

        def _packed(self, query: Tensor, key: Tensor, value: Tensor, params) -> Tensor:
            """megatron's THD format (``PackedSeqParams``, what TE's attention takes): ``query`` [t, heads,
            d] holds sequences one after the other at ``cu_seqlens_q``; each attends causally (and within
            its window) to its own tokens only, one SDPA call per sequence, so no [t, t] mask is built and
            the causal kernel skips what lies above the diagonal. Returns [t, hidden / tp]."""
            if params.qkv_format != "thd":
                raise ValueError(
                    f"the SDPA spec takes packed sequences in 'thd' format, not {params.qkv_format!r}"
                )
            if params.cu_seqlens_kv is not None and not torch.equal(
                params.cu_seqlens_kv, params.cu_seqlens_q
            ):
                raise ValueError("the SDPA spec packs self-attention only (cu_seqlens_kv == cu_seqlens_q)")
            if self.training and self.attention_dropout.p > 0:
                raise ValueError("the SDPA spec's packed sequences do not support attention dropout")
            bounds = params.cu_seqlens_q.tolist()
            gqa = query.shape[1] != key.shape[1]
            outs = []
            for start, end in zip(bounds[:-1], bounds[1:]):
                q, k, v = (t[start:end].transpose(0, 1)[None] for t in (query, key, value))  # [1, h, l, d]
                allowed = self._mask(None, end - start, end - start, q.device)
                out = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=allowed,
                    is_causal=allowed is None,
                    scale=self.softmax_scale,
                    enable_gqa=gqa,
                )
                outs.append(out[0].transpose(0, 1))  # [l, h, d]
            return torch.cat(outs).reshape(query.shape[0], self.hidden_size_per_partition)

    return SDPADotProductAttention


def _band_blocked(sq: int, sk: int, window: tuple[int, int], device: torch.device) -> Tensor:
    """True where query i (aligned to the end of the keys) may NOT see key j: megatron's window rule."""
    ones = torch.ones(sq, sk, dtype=torch.bool, device=device)
    inside = torch.tril(torch.triu(ones, diagonal=sk - sq - window[0]), diagonal=sk - sq + window[1])
    return ~inside


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm with megatron's norm constructor, allowing sequence parallelism.

    megatron's ``WrappedTorchNorm`` (the local spec's norm without TE or apex) refuses
    ``sequence_parallel``. An RMSNorm needs nothing from it: it normalises each token on its own, so a
    rank's slice of the sequence normalises alone. Its weight is then replicated over TP while each rank
    sees other tokens, so the weight is marked ``sequence_parallel`` and megatron's
    ``finalize_model_grads`` sums its gradient over the TP group (what TE's and apex's norms do). Same
    parameter name (``weight``) as ``WrappedTorchNorm``: checkpoints do not change.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if config.normalization != "RMSNorm":
            raise ValueError(f"c2f's local norm is RMSNorm, the config asks for {config.normalization}")
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def get_layer_spec(name: LayerSpecName):
    """The megatron ``ModuleSpec`` of one Mistral transformer layer for a spec name (``auto`` resolved)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    resolved = resolve_layer_spec(name)
    announce_layer_spec(name, resolved)
    if resolved == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if resolved == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = _sdpa_attention_class()
    return spec


def get_block_spec(name: LayerSpecName, config, vp_stage: int | None, pp_rank: int):
    """What ``GPTModel`` takes as ``transformer_layer_spec``: TE's layer spec as it is, or for the local
    and SDPA specs the block of this stage's layers with ``RMSNorm`` as the final norm too (megatron
    would pick ``WrappedTorchNorm`` there, which refuses sequence parallelism)."""
    spec = get_layer_spec(name)
    if resolve_layer_spec(name) == "te":
        return spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layers = get_num_layers_to_build(config, vp_stage, pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=RMSNorm)
