"""Log-probabilities and entropy over a vocabulary sharded across a tensor-parallel group.

megatron's ``vocab_parallel_cross_entropy`` reduces over the *global* TP group; a PPO role on its own
layout (``platform.role_layout``) has its own TP group, so these take the group explicitly. The autograd
function is megatron's math (max and sum-exp reduced over the group, the target logit read on the rank
that owns it) with the gradient ``onehot - softmax`` per rank; ``group=None`` means an unsharded vocab.
The no-grad helpers serve the logged statistics: entropy, and the probability the policy would put on the ids
it is kept from sampling (``masked_ids_mass``: the coarse actor's push against the cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _all_reduce(x: Tensor, group: Any, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, vocab_start: int, group: Any) -> Tensor:
        z = logits.float()
        m = _all_reduce(z.amax(dim=-1), group, dist.ReduceOp.MAX)
        shifted = z - m.unsqueeze(-1)
        exp = torch.exp(shifted)
        total = _all_reduce(exp.sum(dim=-1), group)
        local = labels - vocab_start
        mine = (local >= 0) & (local < z.shape[-1])
        index = torch.where(mine, local, 0).unsqueeze(-1)
        target = torch.where(mine, shifted.gather(-1, index).squeeze(-1), 0.0)
        target = _all_reduce(target, group)
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), index, mine)
        return target - torch.log(total)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        softmax, index, mine = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        grad_logits = -softmax * g
        grad_logits.scatter_add_(-1, index, torch.where(mine.unsqueeze(-1), g, 0.0))
        return grad_logits, None, None, None


def vocab_parallel_logprobs(logits: Tensor, labels: Tensor, vocab_start: int, group: Any) -> Tensor:
    """``log softmax(logits)[label]`` where ``logits[..., i]`` is global id ``vocab_start + i`` on this rank
    and the other ids live on the other ranks of ``group`` (-inf logits allowed, not at the label)."""
    return _VocabParallelLogProb.apply(logits, labels, vocab_start, group)


@torch.no_grad()
def vocab_parallel_entropy(logits: Tensor, group: Any) -> Tensor:
    """Entropy of ``softmax`` over a vocabulary sharded on the last dim across ``group`` (-inf allowed)."""
    return vocab_parallel_logsumexp_entropy(logits, group)[1]


@torch.no_grad()
def vocab_parallel_logsumexp_entropy(logits: Tensor, group: Any) -> tuple[Tensor, Tensor]:
    """``(logsumexp, entropy)`` of ``softmax(logits)`` over a vocabulary sharded across ``group``: one pass,
    two reductions over the group."""
    z = logits.float()
    m = _all_reduce(z.amax(dim=-1, keepdim=True), group, dist.ReduceOp.MAX)
    shifted = z - m
    e = torch.exp(shifted)
    sums = _all_reduce(torch.stack([e.sum(-1), torch.where(e > 0, e * shifted, 0.0).sum(-1)]), group)
    log_total = torch.log(sums[0])
    return m.squeeze(-1) + log_total, log_total - sums[1] / sums[0]


@torch.no_grad()
def vocab_parallel_columns(logits: Tensor, ids: Sequence[int], vocab_start: int, group: Any) -> Tensor:
    """``logits[..., ids]`` (global ids) on every rank of ``group``, each column read on the rank that holds
    it: ``[..., len(ids)]`` fp32."""
    width = logits.shape[-1]
    out = logits.new_zeros((*logits.shape[:-1], len(ids)), dtype=torch.float32)
    for k, i in enumerate(ids):
        if 0 <= i - vocab_start < width:
            out[..., k] = logits[..., i - vocab_start].float()
    return _all_reduce(out, group)


def masked_ids_mass(allowed_logsumexp: Tensor, masked_logits: Tensor) -> Tensor:
    """The probability the *unmasked* softmax puts on the masked ids: with ``A = exp(allowed_logsumexp)``
    (every id but those) and ``S = sum exp(masked_logits)`` (theirs, ``[..., k]``), ``S / (A + S)``."""
    return torch.sigmoid(torch.logsumexp(masked_logits.float(), dim=-1) - allowed_logsumexp)
