"""The supervised training run: from a job config and a task to trained, checkpointed weights.

A ``Task`` (``tasks/lm.py``, ``tasks/sft.py``, ``tasks/reward.py``) supplies the data, the collator and the
megatron ``forward_step``; ``run`` does the rest (after ``init_distributed``): the model
(``engine.RoleModel``: LM head or value head, initial weights), auto-resume from the latest complete
checkpoint, and the steps through the shared ``run_loop`` (logging, NaN guard, periodic eval and saves,
exit and preemption).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from c2f_megatron.checkpoint.megatron_dir import CheckpointMetadata, read_metadata
from c2f_megatron.checkpoint.resolve import check_tokenizer, resolve_checkpoint
from c2f_megatron.engine.role_model import RoleModel
from c2f_megatron.engine.schedule import StepResult
from c2f_megatron.models.config import ModelConfig
from c2f_megatron.platform.distributed import is_rank_zero
from c2f_megatron.training.checkpointing import (
    ModelState,
    TrainerState,
    load_training_checkpoint,
    resume_checkpoint,
    save_training_checkpoint,
)
from c2f_megatron.training.config import TrainerSections
from c2f_megatron.training.data_order import DataOrder, epoch_of
from c2f_megatron.training.logging import WANDB_ID_KEY, MetricsLogger
from c2f_megatron.training.run_loop import LoopSettings, StepOutcome, run_loop
from c2f_megatron.training.summary import (
    RunSummary,
    job_outputs,
    read_metrics_jsonl,
    start_end,
    stopped_progress,
)

logger = logging.getLogger(__name__)


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
    skipped_records: Path | None = None  # the list of malformed data records, when there were any


@dataclass
class RunResult:
    step: int
    history: list[dict[str, float]]  # per-step train metrics of this process's run (rank 0 and others)
    eval_metrics: dict[str, float]
    checkpoint: Path | None


def resolve_model_config(cfg: TrainerSections, source: Path | None) -> ModelConfig:
    """Architecture from the checkpoint the run starts from (resumed or ``init_from``), else the config."""
    if source is None:
        return cfg.model.resolve()
    return cfg.model.resolve(from_checkpoint=read_metadata(source).model)


def eval_batches(task: Task, micro_batch_size: int, dp_rank: int, dp_size: int, max_batches: int):
    """This rank's eval micro-batches: samples dealt round-robin over DP ranks, in order."""
    mine = list(range(dp_rank, len(task.eval), dp_size))
    groups = [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    if max_batches:
        groups = groups[:max_batches]
    return [[task.collate([task.eval[i] for i in group])] for group in groups]


def run(cfg: TrainerSections, task: Task, config_dump: dict[str, Any] | None = None) -> RunResult:
    """Train ``task`` as configured. Call after ``init_distributed(cfg.parallel)``."""
    train_cfg = cfg.train
    ckpt_cfg = cfg.checkpoint
    resume_dir = resume_checkpoint(ckpt_cfg.dir) if (ckpt_cfg.dir and ckpt_cfg.resume) else None
    init_from = None
    if resume_dir is None and ckpt_cfg.init_from:
        init_from = resolve_checkpoint(ckpt_cfg.init_from, field="checkpoint.init_from")
        check_tokenizer(task.tokenizer, read_metadata(init_from), "checkpoint.init_from")
    model_cfg = resolve_model_config(cfg, resume_dir or init_from)
    check_tokenizer(task.tokenizer, CheckpointMetadata(model_cfg), "model")
    role = RoleModel.build(
        task.name,
        task.kind,
        model_cfg,
        init_from=init_from,
        optim=cfg.optim,
        train_steps=train_cfg.train_steps,
        config_overrides=cfg.parallel.activation_overrides(),
    )
    metadata = role.metadata(
        task.tokenizer, {"trainer": task.name, "init_from": ckpt_cfg.init_from}, **task.extra_metadata
    )
    models = [ModelState(role.chunks, metadata, role.optimizer if ckpt_cfg.save_optimizer else None)]

    state = TrainerState()
    if resume_dir is not None:
        state = load_training_checkpoint(resume_dir, models, load_optimizer=ckpt_cfg.save_optimizer)
        if state.scheduler:
            role.scheduler.load_state_dict(state.scheduler)

    layout = role.layout
    num_micro = train_cfg.num_microbatches(layout.dp)
    order = DataOrder(len(task.train), cfg.parallel.seed)
    seqs_per_micro = train_cfg.micro_batch_size * task.sequences_per_sample
    log = MetricsLogger(
        cfg.logging,
        train_cfg.train_steps,
        config_dump,
        start_step=state.step,
        console_keys=CONSOLE_KEYS,
        checkpoint_run_id=state.extra.get(WANDB_ID_KEY),
    )
    if resume_dir is not None:
        log.message(f"resumed from {resume_dir} at step {state.step}")
    log.message(
        f"{task.name}: {len(task.train)} train / {len(task.eval)} eval samples, {num_micro} micro-batch(es) of "
        f"{train_cfg.micro_batch_size} x DP {layout.dp} per step, TP {layout.tp} PP {layout.pp}"
    )

    def save() -> Path | None:
        if not ckpt_cfg.dir:
            return None
        state.scheduler = role.scheduler.state_dict()
        if log.run_id:
            state.extra[WANDB_ID_KEY] = log.run_id
        path = save_training_checkpoint(
            ckpt_cfg.dir,
            models,
            state,
            keep_last=train_cfg.keep_last,
            sharding_type=ckpt_cfg.distrib_optim_sharding_type,
        )
        log.message(f"saved {path}")
        return path

    eval_metrics: dict[str, float] = {}

    def run_eval(step: int) -> None:
        if not task.eval:
            return
        batches = eval_batches(
            task, train_cfg.micro_batch_size, layout.dp_rank, layout.dp, train_cfg.eval_batches
        )
        metrics = role.evaluate(task.forward_step, batches, train_cfg.seq_length, seqs_per_micro)
        if task.finalize_metrics is not None:
            metrics = task.finalize_metrics(metrics)
        log.log(step, metrics, prefix="eval")
        eval_metrics.clear()
        eval_metrics.update(metrics)
        metadata.extra["eval"] = {"step": step, **metrics}  # e.g. reward mean/std for PPO

    tokens_per_step = train_cfg.global_batch_size * task.sequences_per_sample * train_cfg.seq_length

    def step(index: int) -> StepOutcome:
        groups = order.microbatches(
            index, train_cfg.global_batch_size, train_cfg.micro_batch_size, layout.dp_rank, layout.dp
        )
        microbatches = [task.collate([task.train[i] for i in g]) for g in groups]
        result = role.train_step(task.forward_step, microbatches, train_cfg.seq_length, seqs_per_micro)
        if task.finalize_metrics is not None:
            result.metrics = task.finalize_metrics(result.metrics)
        epoch = epoch_of(index + 1, train_cfg.global_batch_size, len(task.train))
        return StepOutcome(
            _step_record(result, tokens_per_step, epoch), result.skipped, train_cfg.global_batch_size
        )

    def after_step(step_index: int, done: bool) -> None:
        if done or (train_cfg.eval_interval and step_index % train_cfg.eval_interval == 0):
            run_eval(step_index)

    settings = LoopSettings(
        total_steps=train_cfg.train_steps,
        log_interval=train_cfg.log_interval,
        save_interval=train_cfg.save_interval,
        exit_after=train_cfg.exit_after_steps,
        max_consecutive_nonfinite=train_cfg.max_consecutive_nan,
    )
    finished_before = state.step >= train_cfg.train_steps
    loop = run_loop(settings, state, step, save, log, resume_dir, after_step)
    if finished_before:  # resumed a finished run: nothing trained, still report eval
        run_eval(state.step)
    if is_rank_zero():
        summary = RunSummary(
            task.name,
            Path(cfg.logging.run_dir),
            log.elapsed(),
            stopped_progress(state.step, train_cfg.train_steps, "step", loop.stopped),
        )
        summary.outputs = job_outputs(
            summary.run_dir, loop.last_saved, cfg.logging, skipped_records=task.skipped_records
        )
        summary.metrics = _start_end_metrics(summary.run_dir)
        summary.finish()
    return RunResult(state.step, loop.history, eval_metrics, loop.last_saved)


# The compact console line: (metric, label); every metric is in metrics.jsonl and wandb.
CONSOLE_KEYS = (
    ("loss", "loss"),
    ("accuracy", "acc"),
    ("reward_gap", "gap"),
    ("grad_norm", "gnorm"),
    ("lr", "lr"),
    ("tokens_per_s", "tok/s"),
)


def _start_end_metrics(run_dir: Path) -> list[tuple[str, float | None, float | None]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    keys = ("loss", "accuracy", "reward_gap", "reward_mean", "reward_std", "grad_norm", "tokens_per_s")
    rows = start_end(read_metrics_jsonl(path, "train"), keys)
    rows += [(f"eval {k}", a, b) for k, a, b in start_end(read_metrics_jsonl(path, "eval"), keys[:5])]
    return rows


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
