"""Typed configuration shared by every trainer (LM, SFT, reward model, PPO): optimizer, loop, checkpoints, logs.

Each trainer's YAML is one job dataclass built from these sections (see ``tasks/``), loaded with
``c2f_megatron.config.load_config`` so a typo fails with the file and the dotted field named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from c2f_megatron.engine.config import OptimConfig
from c2f_megatron.models.config import RUNTIME_FIELDS, ModelConfig, get_preset
from c2f_megatron.platform.distributed import ParallelConfig


@dataclass
class TrainConfig:
    """The loop: steps, batch geometry, intervals and the NaN guard (``parallel.seed`` seeds data order too)."""

    train_steps: int = 100
    micro_batch_size: int = 4  # sequences (LM/SFT) or pairs (reward model) per micro-batch
    global_batch_size: int = 4  # per optimizer step over all data-parallel ranks
    seq_length: int = 256
    log_interval: int = 1
    eval_interval: int = 0  # 0: evaluate only at the end
    eval_batches: int = 0  # 0: the whole eval set
    save_interval: int = 0  # 0: save only at the end
    keep_last: int = 2
    max_consecutive_nan: int = 3
    exit_after_steps: int | None = None  # stop (after saving) once this step is reached: preemption drills

    def __post_init__(self) -> None:
        for name in (
            "train_steps", "micro_batch_size", "global_batch_size", "seq_length", "log_interval", "keep_last",
            "max_consecutive_nan",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_interval", "eval_batches", "save_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.exit_after_steps is not None and self.exit_after_steps < 1:
            raise ValueError(f"exit_after_steps must be >= 1 or null, got {self.exit_after_steps}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}"
            )

    def num_microbatches(self, data_parallel_size: int) -> int:
        """Gradient-accumulation steps per optimizer step on each data-parallel rank."""
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size} x data-parallel size {data_parallel_size}"
            )
        return self.global_batch_size // per_step


@dataclass
class CheckpointConfig:
    """Where step checkpoints go and what a run starts from.

    ``dir``: ``<dir>/step_0000100`` c2f checkpoints; a run resumes from the latest complete one there.
    ``init_from``: a c2f checkpoint (e.g. a converted HF model) whose weights start a fresh run; ignored
    when ``dir`` already holds a checkpoint to resume.
    """

    dir: str | None = None
    init_from: str | None = None
    resume: bool = True
    save_optimizer: bool = True
    distrib_optim_sharding_type: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"


@dataclass
class LoggingConfig:
    """wandb (offline by default: no network needed, ``wandb sync`` later) and the console."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "c2f-megatron"
    wandb_entity: str | None = None
    run_name: str | None = None
    run_dir: str = "runs/default"  # metrics.jsonl, resolved config, summary.md, wandb files
    verbose: bool = False  # every metric on each console progress line (``--verbose``), not the key ones


@dataclass
class ModelSection:
    """Model architecture: a preset with overrides, or every field of ``ModelConfig`` from ``overrides``.

    When the run starts from a checkpoint, its ``c2f_checkpoint.json`` defines the architecture and only
    run-time fields (``layer_spec``, dropouts) may be overridden here.
    """

    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ValueError(f"model.overrides: unknown field(s) {unknown}; known: {sorted(known)}")
        if self.preset is not None:  # the architecture a run from scratch builds (a checkpoint's wins)
            get_preset(self.preset, **self.overrides)

    def resolve(self, from_checkpoint: ModelConfig | None = None) -> ModelConfig:
        if from_checkpoint is not None:
            fixed = sorted(
                k
                for k, v in self.overrides.items()
                if k not in RUNTIME_FIELDS and getattr(from_checkpoint, k) != v
            )
            if fixed:
                raise ValueError(
                    f"model.overrides {fixed} differ from the checkpoint's architecture; only "
                    f"{list(RUNTIME_FIELDS)} may change when starting from a checkpoint"
                )
            return dataclasses.replace(from_checkpoint, **self.overrides)
        if self.preset is not None:
            return get_preset(self.preset, **self.overrides)
        return ModelConfig(**self.overrides)


@dataclass
class TrainerSections:
    """The sections every job config has; trainers add their ``data`` (and task) sections."""

    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        tp = self.parallel.tensor_model_parallel_size
        if self.parallel.sequence_parallel and tp > 1 and self.train.seq_length % tp:
            raise ValueError(
                f"train.seq_length {self.train.seq_length} must be a multiple of "
                f"parallel.tensor_model_parallel_size {tp} with parallel.sequence_parallel"
            )
