"""Per-row results of a model over a batch that every rank holds, on the model's own layout.

PPO's roles score the whole iteration's batch (the same rows on every rank) at their own TP/PP: each
data-parallel rank of the role's layout takes its contiguous slice of rows, runs megatron's forward-only
schedule over it in micro-batches, the last pipeline stage's results are broadcast along the pipeline,
and the slices are gathered back over data parallel, so every rank returns the results for all rows.

A batch is anything with ``tokens`` ([b, s]), ``dp_shard(rank, size)``, ``micro_batches(rows, pack)``
and ``len`` (``rl.experience.Experience``). A micro-batch gives the model its inputs (``model_inputs()``:
padded rows, or rows packed without padding) and maps the model's output back to its rows
(``output_rows(output)``), which the per-row math (``compute``, ``loss_func``) reads with ``rows``. The
output layer runs only on the positions the per-row math reads (``output_positions()``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor

from c2f_megatron.checkpoint.megatron_dir import unwrap_model
from c2f_megatron.engine.role_model import RoleModel
from c2f_megatron.platform.role_layout import RoleLayout


class MicroBatch(Protocol):
    rows: Any  # what the per-row math reads

    def __len__(self) -> int: ...

    # tokens [m, s], their attention mask, or (packed rows) None and megatron's PackedSeqParams (THD)
    def model_inputs(self) -> tuple[Tensor, Tensor | None, Any]: ...

    def output_positions(self) -> Tensor: ...  # the sequence positions whose output is read

    def output_rows(self, output: Tensor, selected: bool = False) -> Tensor: ...  # the output per row


class RowBatch(Protocol):
    tokens: Tensor

    def __len__(self) -> int: ...

    def dp_shard(self, dp_rank: int, dp_size: int) -> RowBatch: ...

    def micro_batches(self, rows: int, pack: bool = False) -> list[MicroBatch]: ...


def gather_rows(local: Tensor, layout: RoleLayout) -> Tensor:
    """Concatenate every data-parallel rank's rows of ``layout`` in rank order (identity without DP)."""
    if layout.dp == 1:
        return local
    flag = local.dtype == torch.bool  # gloo has no bool all_gather
    x = local.to(torch.uint8) if flag else local
    parts = [torch.empty_like(x) for _ in range(layout.dp)]
    torch.distributed.all_gather(parts, x.contiguous(), group=layout.dp_group)
    out = torch.cat(parts)
    return out.bool() if flag else out


def share_from_last_stage(
    value: Tensor | None, shape: list[int], dtype: torch.dtype, layout: RoleLayout, over_tp: bool = False
) -> Tensor:
    """A tensor the last pipeline stage of ``layout`` computed, on every stage (``value`` is None
    elsewhere); ``over_tp`` then sends TP rank 0's copy to its TP group (sampled tokens must not drift)."""
    from c2f_megatron.platform.distributed import device

    if layout.pp > 1:
        if value is None:
            value = torch.empty(shape, dtype=dtype, device=device())
        value = value.to(dtype).contiguous()
        torch.distributed.broadcast(value, src=layout.last_stage_rank, group=layout.pp_group)
    if value is None:
        raise RuntimeError(f"{layout.name}: the last pipeline stage computed nothing to share")
    if over_tp and layout.tp > 1:
        src = torch.distributed.get_global_rank(layout.tp_group, 0)
        torch.distributed.broadcast(value, src=src, group=layout.tp_group)
    return value


def model_forward(data_iterator: Any, model: torch.nn.Module, loss_func: Callable) -> tuple[Tensor, Callable]:
    """megatron ``forward_step_func``: the model on a row micro-batch with its attention mask."""
    from c2f_megatron.models.gpt import position_ids_for

    mb = next(data_iterator)
    tokens, mask, packed = mb.model_inputs()
    width = tokens.shape[1]
    extra = _sp_padding(model.config, width)
    if extra:  # sequence parallelism splits the sequence over TP: pad at the end (causal: nobody sees it)
        tokens = torch.nn.functional.pad(tokens, (0, extra))
        if packed is None:
            mask = torch.nn.functional.pad(mask, (0, extra, 0, extra), value=True)
        else:  # the padding is one more sequence of the pack
            packed = _with_padding_sequence(packed, width + extra)
    gpt = unwrap_model(model)
    keep = mb.output_positions() if gpt.post_process and not gpt.config.sequence_parallel else None
    with _output_layer_reads(gpt, keep):
        output = model(tokens, position_ids_for(tokens), mask, packed_seq_params=packed)
    return output, partial(_on_rows, loss_func, mb, width, keep is not None)


def _with_padding_sequence(packed: Any, total: int) -> Any:
    """``packed`` (PackedSeqParams) with the tokens from its end to ``total`` as one more sequence."""
    cu = packed.cu_seqlens_q
    cu = torch.cat([cu, torch.tensor([total], dtype=cu.dtype, device=cu.device)])
    longest = max(packed.max_seqlen_q, total - int(packed.cu_seqlens_q[-1]))
    return dataclasses.replace(
        packed, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )


@contextlib.contextmanager
def _output_layer_reads(gpt: torch.nn.Module, positions: Tensor | None):
    """While the block runs, the output layer (vocabulary projection or value head) of ``gpt`` (the last
    stage) gets only the hidden states at ``positions`` of the sequence ([s, b, h] -> [len(positions), b,
    h]), so the model's output holds only those: nobody reads the logits of prompt tokens, and the output
    layer of a tied-vocabulary model such as SmolLM2 is a fifth of its forward. None: all positions."""
    if positions is None:
        yield
        return

    def select(_module, args):
        return (args[0].index_select(0, positions), *args[1:])

    handle = gpt.output_layer.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def _on_rows(loss_func: Callable, mb: MicroBatch, width: int, selected: bool, output: Tensor):
    """``loss_func(rows, their output)``: the micro-batch's rows and the model output mapped onto them
    (``selected``: the output holds the micro-batch's ``output_positions()`` only)."""
    out = output if selected else output[:, :width]
    return loss_func(mb.rows, mb.output_rows(out, selected))


def _collect(compute: Callable[[Tensor, Any], dict[str, Tensor]], rows: Any, output: Tensor):
    """Forward-only ``loss_func``: no loss, the computed tensors ride in the 'reduced' slot."""
    out = {k: v.detach() for k, v in compute(output, rows).items()}
    zero = torch.zeros((), device=output.device)
    return zero, torch.ones((), dtype=torch.int, device=output.device), out


def forward_rows(
    role: RoleModel,
    batch: RowBatch,
    micro_batch_size: int,
    compute: Callable[[Tensor, Any], dict[str, Tensor]],
    shapes: dict[str, tuple[int, ...]],
    pack: bool = False,
) -> dict[str, Tensor]:
    """``compute(output_rows, rows)`` over the whole ``batch`` on ``role``'s layout (see the module
    docstring), in micro-batches of ``micro_batch_size`` rows or (``pack``) packed without padding; every
    rank returns ``[len(batch), *shapes[key]]`` float32 tensors."""
    from c2f_megatron.platform.distributed import device

    layout = role.layout
    local = batch.dp_shard(layout.dp_rank, layout.dp)
    fwd = partial(model_forward, loss_func=partial(_collect, compute))
    outputs = role.forward_only(
        fwd, local.micro_batches(micro_batch_size, pack), _seq_length(role, batch), micro_batch_size
    )
    result: dict[str, Tensor] = {}
    for key, row_shape in shapes.items():
        value = torch.cat([o[key] for o in outputs]).float() if layout.is_last_stage else None
        value = share_from_last_stage(value, [len(local), *row_shape], torch.float32, layout)
        result[key] = gather_rows(value.to(device()), layout)
    return result


def train_rows(
    role: RoleModel,
    batch: RowBatch,
    micro_batch_size: int,
    loss_func: Callable,
    loss_key: str,
    pack: bool = False,
) -> Any:
    """One optimizer step of ``role`` on a minibatch every rank holds: its data-parallel slice in
    micro-batches (as ``forward_rows``), ``loss_func(rows, output_rows)`` returning the loop's
    ``(loss, count, metrics)``."""
    micro = batch.dp_shard(role.layout.dp_rank, role.layout.dp).micro_batches(micro_batch_size, pack)
    fwd = partial(model_forward, loss_func=loss_func)
    return role.train_step(fwd, micro, _seq_length(role, batch), micro_batch_size, loss_key=loss_key)


def _sp_padding(config: Any, width: int) -> int:
    """Tokens ``model_forward`` appends so that sequence parallelism splits ``width`` evenly over TP."""
    return -width % config.tensor_model_parallel_size if config.sequence_parallel else 0


def _seq_length(role: RoleModel, batch: RowBatch) -> int:
    """The sequence length the schedule sends between stages: ``model_forward``'s padded width."""
    width = batch.tokens.shape[1]
    return width + _sp_padding(role.chunks[0].config, width)
