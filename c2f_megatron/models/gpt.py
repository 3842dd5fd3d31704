"""Build stock megatron ``GPTModel``s for a ``ModelConfig`` at the current parallel layout.

The model is megatron's own class (so its sharded state dict, pipeline hooks and inference paths apply);
this module only chooses the spec, the padded vocab and the per-stage flags, including one chunk per
virtual pipeline stage for interleaved schedules.
"""

from __future__ import annotations

import torch
from torch import Tensor

from c2f_megatron.models.config import ModelConfig, gpt_model_kwargs, to_transformer_config
from c2f_megatron.models.specs import get_block_spec
from c2f_megatron.platform.role_layout import RoleLayout, global_layout


def build_gpt_model(
    model_cfg: ModelConfig,
    vp_stage: int | None = None,
    layout: RoleLayout | None = None,
    lm_head: bool = True,
    **config_overrides,
):
    """One GPTModel chunk for this rank (pre/post-process set from the pipeline position).

    ``layout``: the role's own TP/PP groups (default: megatron's global ``parallel_state``). ``lm_head``
    False builds the backbone for a scalar head (``models.value_head``): the output layer is never tied to
    the embedding then, whatever the architecture says, so no embedding group syncs it.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    layout = layout or global_layout()
    tp, pp, vpp = layout.tp, layout.pp, layout.vpp
    config = to_transformer_config(model_cfg, tp, pp, vpp, **config_overrides)
    if layout.is_global:
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    else:
        pre, post = layout.is_first_stage, layout.is_last_stage
    spec = get_block_spec(model_cfg.layer_spec, config, vp_stage, layout.pp_rank)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model_cfg.padded_vocab_size(tp),
        pre_process=pre,
        post_process=post,
        vp_stage=vp_stage,
        pg_collection=layout.pg_collection,
        **(gpt_model_kwargs(model_cfg) | ({} if lm_head else {"share_embeddings_and_output_weights": False})),
    )
    from c2f_megatron.models.config import DTYPES
    from c2f_megatron.platform.distributed import device

    # Every parameter in the model dtype, as Megatron-LM's Float16Module casts it: megatron's torch norms
    # create fp32 weights whatever params_dtype says, and the mixed-precision optimizer checkpoints only
    # the bf16/fp16 parameters it holds fp32 copies of. (RoPE frequencies are not parameters: they stay fp32.)
    return model.to(device=device(), dtype=DTYPES[model_cfg.params_dtype])


def build_model_chunks(model_cfg: ModelConfig, layout: RoleLayout | None = None, **config_overrides) -> list:
    """All chunks this rank holds: one, or one per virtual pipeline stage (interleaved schedule)."""
    layout = layout or global_layout()
    if layout.vpp is None:
        return [build_gpt_model(model_cfg, layout=layout, **config_overrides)]
    return [
        build_gpt_model(model_cfg, vp_stage=i, layout=layout, **config_overrides) for i in range(layout.vpp)
    ]


def mask_padded_vocab(
    logits: Tensor, true_vocab_size: int, vocab_start: int = 0, inplace: bool = False
) -> Tensor:
    """Set the logits of vocab-padding rows to -inf so sampling and log-probs see only the true vocab.

    ``logits[..., i]`` is global vocab id ``vocab_start + i`` (a TP rank's slice starts at
    ``tp_rank * vocab/tp``). Padding rows exist only because the vocab is rounded up for TP. A copy unless
    ``inplace`` (for a caller that owns ``logits``).
    """
    first_pad = max(true_vocab_size - vocab_start, 0)
    if first_pad >= logits.shape[-1]:
        return logits
    if not inplace:
        logits = logits.clone()
    logits[..., first_pad:] = float("-inf")
    return logits


def position_ids_for(tokens: Tensor) -> Tensor:
    """Position ids 0..s-1 for a [b, s] batch (megatron's RoPE uses 0..s-1 itself; kept for the API)."""
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
