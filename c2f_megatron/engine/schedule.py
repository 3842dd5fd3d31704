"""megatron-core's training machinery on one layout, as plain functions (``RoleModel`` composes them).

- ``setup_training``: megatron ``DistributedDataParallel`` around each chunk, ``get_megatron_optimizer``
  (Adam/AdamW, optionally the distributed optimizer), ``OptimizerParamScheduler`` (warmup + decay), and the
  model-config hooks the pipeline schedules call (grad sync, per-token loss scaling).
- ``train_step``: one optimizer step over a list of micro-batches through ``get_forward_backward_func``
  (no pipelining, 1F1B or interleaved, for the layout). A non-finite loss or grad norm skips the update on
  every rank.
- ``run_schedule`` / ``evaluate``: forward-only over micro-batches.

Loss convention (``calculate_per_token_loss=True``): a task's ``loss_func`` returns
``(loss_sum, num_units, metrics)`` where ``num_units`` counts what the loss averages over (tokens for
LM/SFT, pairs for the reward model) and each metric is a tensor ``[sum, count]``. The schedule sums over
micro-batches and ``finalize_model_grads`` divides the gradients by the global count, so the update is
the mean over the whole global batch whatever the TP/PP/DP split or the number of micro-batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from c2f_megatron.engine.config import OptimConfig
from c2f_megatron.models.config import DTYPES, ModelConfig
from c2f_megatron.platform.role_layout import RoleLayout

ForwardStepFunc = Callable[[Any, torch.nn.Module], tuple[torch.Tensor, Callable]]


@dataclass
class StepResult:
    metrics: dict[str, float]  # reduced over micro-batches and data-parallel ranks, same on every rank
    grad_norm: float
    lr: float
    skipped: bool
    seconds: float


def wrap_ddp(
    chunks: Sequence[torch.nn.Module], optim: OptimConfig, layout: RoleLayout
) -> list[torch.nn.Module]:
    """megatron DDP around each chunk (bucketing only for the first chunk, as Megatron-LM does)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=optim.overlap_grad_reduce,
        overlap_param_gather=optim.overlap_param_gather,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            disable_bucketing=i > 0,
            pg_collection=layout.pg_collection,
        )
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(
    ddp_chunks: Sequence[torch.nn.Module],
    optim: OptimConfig,
    model_cfg: ModelConfig,
    layout: RoleLayout,
):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = DTYPES[model_cfg.params_dtype]
    config = OptimizerConfig(
        optimizer=optim.optimizer,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        overlap_param_gather=optim.overlap_param_gather,
    )
    if layout.is_global:
        return get_megatron_optimizer(config, list(ddp_chunks))
    # a role's own groups: megatron takes them from the collection (no gloo copies of custom groups)
    return get_megatron_optimizer(
        config, list(ddp_chunks), use_gloo_process_groups=False, pg_collection=layout.pg_collection
    )


def build_scheduler(optimizer: Any, optim: OptimConfig, train_steps: int):
    """Warmup then decay, in optimizer steps (the scheduler is stepped once per successful update)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = max(optim.decay_steps or train_steps, optim.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )


def configure_schedule_hooks(ddp_chunks: Sequence[torch.nn.Module], optimizer: Any) -> None:
    """Set the hooks megatron's schedules call: grad finalisation, loss scaling, no-sync for accumulation."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(ddp_chunks[0])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if not config.calculate_per_token_loss:
        raise ValueError("build the model with calculate_per_token_loss=True (see the loss convention above)")
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if ddp_chunks[0].ddp_config.overlap_grad_reduce:
        sync = [chunk.start_grad_sync for chunk in ddp_chunks]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    if ddp_chunks[0].ddp_config.overlap_param_gather:
        gather = [chunk.start_param_sync for chunk in ddp_chunks]
        config.param_sync_func = gather[0] if len(gather) == 1 else gather


def setup_training(
    chunks: Sequence[torch.nn.Module],
    optim: OptimConfig,
    model_cfg: ModelConfig,
    train_steps: int,
    layout: RoleLayout,
) -> tuple[list[torch.nn.Module], Any, Any]:
    """DDP-wrapped chunks, optimizer and scheduler (schedule hooks set) for freshly built (and possibly
    loaded) chunks on ``layout`` (the chunks' own groups)."""
    ddp_chunks = wrap_ddp(chunks, optim, layout)
    optimizer = build_optimizer(ddp_chunks, optim, model_cfg, layout)
    scheduler = build_scheduler(optimizer, optim, train_steps)
    configure_schedule_hooks(ddp_chunks, optimizer)
    return ddp_chunks, optimizer, scheduler


def _microbatch_iterators(chunks: Sequence[torch.nn.Module], microbatches: Sequence[Any]):
    """One iterator per chunk (the interleaved schedule pulls from each chunk's own iterator)."""
    if len(chunks) == 1:
        return iter(microbatches)
    return [iter(microbatches) for _ in chunks]


def run_schedule(
    chunks: Sequence[torch.nn.Module],
    layout: RoleLayout,
    forward_step_func: ForwardStepFunc,
    microbatches: Sequence[Any],
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> list[Any]:
    """megatron's schedule for ``layout`` (no pipelining, 1F1B or interleaved) over ``microbatches``;
    returns the last stage's per-micro-batch loss outputs (empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    schedule = get_forward_backward_func(pp_size=layout.pp, vp_size=layout.vpp)
    return schedule(
        forward_step_func=forward_step_func,
        data_iterator=_microbatch_iterators(chunks, microbatches),
        model=list(chunks),
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        **layout.schedule_kwargs(get_model_config(chunks[0])),
    )


def reduce_metrics(losses_reduced: Iterable[dict[str, torch.Tensor]], layout: RoleLayout) -> dict[str, float]:
    """Sum ``[sum, count]`` metrics over micro-batches and data-parallel ranks; the same dict on all ranks.

    Only the last pipeline stage has loss outputs; it broadcasts the result along its pipeline group.
    """
    totals: dict[str, torch.Tensor] = {}
    for item in losses_reduced:
        for key, value in item.items():
            value = value.detach().double().reshape(-1)
            totals[key] = totals[key] + value if key in totals else value.clone()
    result: dict[str, float] = {}
    if layout.is_last_stage and totals:
        keys = sorted(totals)
        stacked = torch.stack([totals[k] for k in keys]).to(_device())
        if layout.dp > 1:
            dist.all_reduce(stacked, group=layout.dp_group)
        for key, (total, count) in zip(keys, stacked.tolist()):
            result[key] = total / count if count else float("nan")
    if layout.pp > 1:
        holder = [result]
        dist.broadcast_object_list(holder, src=layout.last_stage_rank, group=layout.pp_group)
        result = holder[0]
    return result


def _device() -> torch.device:
    from c2f_megatron.platform.distributed import device

    return device()


def _all_finite(*values: float) -> bool:
    """True on every rank only if the values are finite on every rank."""
    bad = torch.tensor([0.0 if all(math.isfinite(v) for v in values) else 1.0], device=_device())
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def _clip_and_step(optimizer: Any, grad_norm: float) -> None:
    """The tail of ``MegatronOptimizer.step`` after the grad norm is known: clip, then update."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(
                params,
                max_norm=opt.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    optimizer.step_with_ready_grads()


def train_step(
    chunks: Sequence[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    layout: RoleLayout,
    forward_step_func: ForwardStepFunc,
    microbatches: Sequence[Any],
    seq_length: int,
    micro_batch_size: int,
    loss_key: str = "loss",
) -> StepResult:
    """One optimizer step. ``micro_batch_size`` counts sequences (the pipeline's p2p tensor shape).

    ``microbatches`` holds whatever ``forward_step_func`` pulls with ``next(data_iterator)``. When the
    loss or the grad norm is NaN/inf on any rank, no parameter or optimizer state changes (``skipped``).
    """
    start = time.perf_counter()
    for chunk in chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule(
        chunks, layout, forward_step_func, microbatches, seq_length, micro_batch_size, False
    )
    metrics = reduce_metrics(losses, layout)
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    ok = not found_inf and _all_finite(metrics.get(loss_key, 0.0), grad_norm)
    lr = optimizer.param_groups[0]["lr"]  # the rate this update used
    if ok:
        _clip_and_step(optimizer, grad_norm)
        scheduler.step(increment=1)
    return StepResult(metrics, grad_norm, lr, not ok, time.perf_counter() - start)


@torch.no_grad()
def evaluate(
    chunks: Sequence[torch.nn.Module],
    forward_step_func: ForwardStepFunc,
    batches: Iterable[Sequence[Any]],
    seq_length: int,
    micro_batch_size: int,
    layout: RoleLayout,
) -> dict[str, float]:
    """Forward-only over groups of micro-batches; metrics pooled over all of them (sums, then ratio)."""
    for chunk in chunks:
        chunk.eval()
    pooled: list[dict[str, torch.Tensor]] = []
    for microbatches in batches:
        out = run_schedule(
            chunks, layout, forward_step_func, microbatches, seq_length, micro_batch_size, True
        )
        pooled.extend(out)
    for chunk in chunks:
        chunk.train()
    return reduce_metrics(pooled, layout)
