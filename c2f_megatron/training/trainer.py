"""The supervised training run: from a job config and a task to trained, checkpointed weights.

A ``Task`` (``tasks/lm.py``, ``tasks/sft.py``, ``tasks/reward.py``) supplies the data, the collator and the
megatron ``forward_step``; ``run`` does the rest (after ``init_distributed``): model build (LM head or value head),
initial weights, auto-resume from the latest complete checkpoint, the step loop with the NaN guard,
periodic eval/save/log, and the final save.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from c2f_megatron.checkpoint.megatron_dir import CheckpointMetadata, read_metadata
from c2f_megatron.models.config import ModelConfig
from c2f_megatron.platform.role_layout import RoleLayout
from c2f_megatron.training.checkpointing import (
    ModelState,
    TrainerState,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from c2f_megatron.training.config import TrainerSections
from c2f_megatron.training.data_order import DataOrder, epoch_of
from c2f_megatron.training.logging import MetricsLogger
from c2f_megatron.training.loop import StepResult, evaluate, setup_training, train_step
from c2f_megatron.training.preemption import PreemptionHandler

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or grad norm."""


@dataclass
class Task:
    """What a trainer supplies to ``run``.

    ``collate(samples)`` turns a list of samples into one micro-batch (tensors on the device) that
    ``forward_step(data_iterator, model)`` consumes. ``sequences_per_sample`` is 2 for preference pairs.
    ``finalize_metrics`` derives extra metrics from the pooled ones (e.g. reward std).
    """

    name: str
    kind: Literal["gpt", "value"]
    train: Sequence[Any]
    eval: Sequence[Any]
    collate: Callable[[list[Any]], Any]
    forward_step: Callable
    sequences_per_sample: int = 1
    tokenizer: dict[str, Any] | None = None
    finalize_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None
    extra_metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    step: int
    history: list[dict[str, float]]  # per-step train metrics of this process's run (rank 0 and others)
    eval_metrics: dict[str, float]
    checkpoint: Path | None


def resolve_model_config(cfg: TrainerSections, resume_dir: Path | None) -> ModelConfig:
    """Architecture from the resumed checkpoint, else from ``init_from``, else from the config."""
    source = resume_dir or (Path(cfg.checkpoint.init_from) if cfg.checkpoint.init_from else None)
    if source is None:
        return cfg.model.resolve()
    return cfg.model.resolve(from_checkpoint=read_metadata(source).model)


def build_chunks(
    kind: str, model_cfg: ModelConfig, layout: RoleLayout | None = None
) -> list[torch.nn.Module]:
    """The rank's chunks with the per-token loss convention the loop relies on (``layout``: a role's own
    TP/PP groups; default megatron's global ones)."""
    if kind == "value":
        from c2f_megatron.models.value_head import build_value_model_chunks

        return build_value_model_chunks(model_cfg, layout=layout, calculate_per_token_loss=True)
    from c2f_megatron.models.gpt import build_model_chunks

    return build_model_chunks(model_cfg, layout=layout, calculate_per_token_loss=True)


def load_initial_weights(kind: str, chunks: list[torch.nn.Module], ckpt: str | Path) -> CheckpointMetadata:
    if kind == "value":
        from c2f_megatron.models.value_head import load_backbone_checkpoint

        return load_backbone_checkpoint(chunks, ckpt)
    from c2f_megatron.checkpoint.megatron_dir import CheckpointError, load_model_checkpoint

    meta = read_metadata(ckpt)
    if meta.kind != "gpt":
        raise CheckpointError(
            f"{ckpt}: field 'kind' is {meta.kind!r}; an LM/SFT run needs a 'gpt' checkpoint"
        )
    return load_model_checkpoint(chunks, ckpt)


def eval_batches(task: Task, micro_batch_size: int, dp_rank: int, dp_size: int, max_batches: int):
    """This rank's eval micro-batches: samples dealt round-robin over DP ranks, in order."""
    mine = list(range(dp_rank, len(task.eval), dp_size))
    groups = [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    if max_batches:
        groups = groups[:max_batches]
    return [[task.collate([task.eval[i] for i in group])] for group in groups]


def run(cfg: TrainerSections, task: Task, config_dump: dict[str, Any] | None = None) -> RunResult:
    """Train ``task`` as configured. Call after ``init_distributed(cfg.parallel)``."""
    from megatron.core import parallel_state

    train_cfg = cfg.train
    ckpt_cfg = cfg.checkpoint
    resume_dir = latest_checkpoint(ckpt_cfg.dir) if (ckpt_cfg.dir and ckpt_cfg.resume) else None
    model_cfg = resolve_model_config(cfg, resume_dir)
    if task.tokenizer and task.tokenizer.get("vocab_size", 0) > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {task.tokenizer['vocab_size']} ids but model.vocab_size is {model_cfg.vocab_size}"
        )
    chunks = build_chunks(task.kind, model_cfg)
    if resume_dir is None and ckpt_cfg.init_from:
        load_initial_weights(task.kind, chunks, ckpt_cfg.init_from)
    tm = setup_training(chunks, cfg.optim, model_cfg, train_cfg.train_steps)
    metadata = CheckpointMetadata(
        model=model_cfg,
        tokenizer=task.tokenizer,
        kind=task.kind,
        dtype=model_cfg.params_dtype,
        provenance={"trainer": task.name, "init_from": ckpt_cfg.init_from},
        extra=dict(task.extra_metadata),
    )
    models = [ModelState(tm.chunks, metadata, tm.optimizer if ckpt_cfg.save_optimizer else None)]

    state = TrainerState()
    if resume_dir is not None:
        state = load_training_checkpoint(resume_dir, models, load_optimizer=ckpt_cfg.save_optimizer)
        if state.scheduler:
            tm.scheduler.load_state_dict(state.scheduler)

    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    num_micro = train_cfg.num_microbatches(dp_size)
    order = DataOrder(len(task.train), cfg.parallel.seed)
    seqs_per_micro = train_cfg.micro_batch_size * task.sequences_per_sample
    log = MetricsLogger(cfg.logging, train_cfg.train_steps, config_dump, start_step=state.step)
    if resume_dir is not None:
        log.message(f"resumed from {resume_dir} at step {state.step}")
    log.message(
        f"{task.name}: {len(task.train)} train / {len(task.eval)} eval samples, {num_micro} micro-batch(es) of "
        f"{train_cfg.micro_batch_size} x DP {dp_size} per step, TP {parallel_state.get_tensor_model_parallel_world_size()}"
        f" PP {parallel_state.get_pipeline_model_parallel_world_size()}"
    )

    def save() -> Path | None:
        if not ckpt_cfg.dir:
            return None
        state.scheduler = tm.scheduler.state_dict()
        path = save_training_checkpoint(
            ckpt_cfg.dir,
            models,
            state,
            keep_last=train_cfg.keep_last,
            sharding_type=ckpt_cfg.distrib_optim_sharding_type,
        )
        log.message(f"saved {path}")
        return path

    def run_eval(step: int) -> dict[str, float]:
        if not task.eval:
            return {}
        batches = eval_batches(task, train_cfg.micro_batch_size, dp_rank, dp_size, train_cfg.eval_batches)
        metrics = evaluate(tm.chunks, task.forward_step, batches, train_cfg.seq_length, seqs_per_micro)
        if task.finalize_metrics is not None:
            metrics = task.finalize_metrics(metrics)
        log.log(step, metrics, prefix="eval")
        return metrics

    history: list[dict[str, float]] = []
    eval_metrics: dict[str, float] = {}
    last_saved: Path | None = resume_dir
    consecutive_bad = 0
    tokens_per_step = train_cfg.global_batch_size * task.sequences_per_sample * train_cfg.seq_length
    preempt = PreemptionHandler.from_env()  # SIGUSR1/SIGTERM or $C2F_PREEMPT_REQUEST: save and stop
    try:
        while state.step < train_cfg.train_steps:
            groups = order.microbatches(
                state.step, train_cfg.global_batch_size, train_cfg.micro_batch_size, dp_rank, dp_size
            )
            microbatches = [task.collate([task.train[i] for i in g]) for g in groups]
            result: StepResult = train_step(
                tm, task.forward_step, microbatches, train_cfg.seq_length, seqs_per_micro
            )
            state.step += 1
            state.consumed_samples += train_cfg.global_batch_size
            if task.finalize_metrics is not None:
                result.metrics = task.finalize_metrics(result.metrics)
            record = _step_record(
                result, tokens_per_step, epoch_of(state.step, train_cfg.global_batch_size, len(task.train))
            )
            history.append(record)
            if state.step % train_cfg.log_interval == 0 or result.skipped:
                log.log(state.step, record)
            if result.skipped:
                consecutive_bad += 1
                log.message(
                    f"step {state.step}: non-finite loss/grad norm ({record.get('loss')}, "
                    f"{result.grad_norm}); update skipped ({consecutive_bad} in a row)"
                )
                if consecutive_bad >= train_cfg.max_consecutive_nan:
                    raise NonFiniteLossError(
                        f"{consecutive_bad} consecutive non-finite steps (train.max_consecutive_nan="
                        f"{train_cfg.max_consecutive_nan}); stopping at step {state.step}. Last good "
                        f"checkpoint: {last_saved}"
                    )
            else:
                consecutive_bad = 0
            done = state.step >= train_cfg.train_steps
            if done or (train_cfg.eval_interval and state.step % train_cfg.eval_interval == 0):
                eval_metrics = run_eval(state.step)
                metadata.extra["eval"] = {"step": state.step, **eval_metrics}  # e.g. reward mean/std for PPO
            exit_now = train_cfg.exit_after_steps is not None and state.step >= train_cfg.exit_after_steps
            periodic = bool(train_cfg.save_interval) and state.step % train_cfg.save_interval == 0
            saved_now = periodic or done or exit_now
            if saved_now:
                last_saved = save()
            if exit_now and not done:
                log.message(f"exit_after_steps={train_cfg.exit_after_steps}: stopping at step {state.step}")
                return RunResult(state.step, history, eval_metrics, last_saved)
            if not done and preempt.should_stop():
                last_saved = last_saved if saved_now else save()
                preempt.mark_preempted(state.step, last_saved)
                log.message(f"preempted ({preempt.reason()}): checkpointed and stopping at step {state.step}")
                return RunResult(state.step, history, eval_metrics, last_saved)
        if not history:  # resumed a finished run: nothing trained, still report eval
            eval_metrics = run_eval(state.step)
    finally:
        preempt.uninstall()
        log.close()
    return RunResult(state.step, history, eval_metrics, last_saved)


def _step_record(result: StepResult, tokens: int, epoch: float) -> dict[str, float]:
    record = dict(result.metrics)
    record.update(
        grad_norm=result.grad_norm,
        lr=result.lr,
        tokens_per_s=tokens / max(result.seconds, 1e-9),
        step_time_s=result.seconds,
        epoch=epoch,
        skipped=float(result.skipped),
    )
    return record


def job_dump(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
