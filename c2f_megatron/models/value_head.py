"""GPT backbone with a scalar head: the reward model and the PPO critic.

The model is megatron's own ``GPTModel`` whose vocabulary projection (``output_layer``) is replaced, on the
last pipeline stage only, by a ``[hidden] -> 1`` linear layer replicated over tensor-parallel ranks. Keeping
the ``GPTModel`` class keeps its pipeline hooks and its sharded state dict: the head's weight is saved
as ``output_layer.weight`` with shape ``[1, hidden]`` (Hugging Face ``MistralForSequenceClassification``'s
``score.weight``), so a value checkpoint loads at any TP/PP like an LM checkpoint. A checkpoint's
``kind: value`` tells the two apart. The head is never tied to the embedding: a value model built from a
tied LM (SmolLM2, Llama-3.2) keeps the LM's embedding as its input layer and gets a fresh head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from c2f_megatron.models.config import ModelConfig
from c2f_megatron.platform.role_layout import RoleLayout, global_layout

VALUE_HEAD_KEY = "output_layer.weight"


class ValueHead(torch.nn.Module):
    """``[s, b, h] -> [s, b, 1]`` with ``GPTModel.output_layer``'s call signature.

    Initialised from a fixed seed (not the rank's RNG) so every tensor-parallel replica starts equal; the
    input (after the final norm) is identical on all TP ranks, so the gradients stay equal too.
    """

    def __init__(self, config: Any, init_std: float, seed: int = 0):
        super().__init__()
        self.config = config
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(1, config.hidden_size, generator=gen) * init_std
        self.weight = torch.nn.Parameter(weight.to(config.params_dtype))

    def forward(self, hidden_states: Tensor, weight: Tensor | None = None, runtime_gather_output: Any = None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # every TP rank computes the same head on the whole sequence: the backward pass takes this
            # rank's slice of the gradient (a reduce-scatter would count it once per TP rank)
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False
            )
        # fp32 head: reward differences are small; bf16 rounding of the score hurts the ranking loss.
        values = torch.nn.functional.linear(hidden_states.float(), self.weight.float())
        return values, None


def build_value_model(
    model_cfg: ModelConfig,
    vp_stage: int | None = None,
    head_seed: int = 0,
    layout: RoleLayout | None = None,
    **overrides,
):
    """A ``GPTModel`` for this rank's pipeline position whose last stage ends in a ``ValueHead``.

    Forward on the last stage returns ``[b, s, 1]`` (float32) values; other stages return hidden states.
    """
    from c2f_megatron.models.gpt import build_gpt_model
    from c2f_megatron.platform.distributed import device

    model = build_gpt_model(model_cfg, vp_stage=vp_stage, layout=layout, lm_head=False, **overrides)
    if model.post_process:
        model.output_layer = ValueHead(model.config, model_cfg.init_method_std, seed=head_seed).to(device())
    return model


def build_value_model_chunks(
    model_cfg: ModelConfig, head_seed: int = 0, layout: RoleLayout | None = None, **overrides
) -> list:
    """All chunks of this rank (one per virtual pipeline stage when interleaving)."""
    layout = layout or global_layout()
    if layout.vpp is None:
        return [build_value_model(model_cfg, head_seed=head_seed, layout=layout, **overrides)]
    return [
        build_value_model(model_cfg, vp_stage=i, head_seed=head_seed, layout=layout, **overrides)
        for i in range(layout.vpp)
    ]


def last_token_index(attention_valid: Tensor) -> Tensor:
    """Index of each row's last real token in a right-padded ``[b, s]`` validity mask (1 = real)."""
    lengths = attention_valid.long().sum(dim=-1)
    if bool((lengths == 0).any()):
        raise ValueError("a sequence with no real token has no score")
    return lengths - 1


def gather_last(values: Tensor, index: Tensor) -> Tensor:
    """``values[b, s]`` (or ``[b, s, 1]``) read at ``index[b]`` -> ``[b]``."""
    if values.dim() == 3:
        values = values.squeeze(-1)
    return values.gather(1, index.view(-1, 1).to(values.device)).squeeze(1)
