"""``RoleModel``: one model on one parallel layout, the thing every trainer, PPO role, eval and merge runs.

It holds the rank's chunks (one, or one per virtual pipeline stage), the layout whose process groups they
use, and, when trained, megatron's DDP wrappers, optimizer and LR scheduler; a frozen model may live on
the CPU between uses (``offload``, GPU runs). It is built from an architecture (``build``) or from a c2f
checkpoint (``from_checkpoint``: the architecture from its metadata, a run-time spec choice allowed), and
offers megatron's schedules on its layout: ``forward_only``, ``train_step`` and ``evaluate``. What a role
computes from the outputs (losses, log-probs, values) is the caller's ``forward_step``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from c2f_megatron.checkpoint.megatron_dir import CheckpointMetadata, read_metadata, unwrap_model
from c2f_megatron.engine import schedule
from c2f_megatron.engine.config import OptimConfig
from c2f_megatron.engine.weights import load_weights
from c2f_megatron.models.config import RUNTIME_FIELDS, ModelConfig
from c2f_megatron.platform.role_layout import RoleLayout, global_layout

Kind = Literal["gpt", "value"]


def build_chunks(
    kind: str, model_cfg: ModelConfig, layout: RoleLayout, initialize: bool = True, **config_overrides
) -> list:
    """The rank's chunks (LM head or scalar head) with the per-token loss convention the schedules rely on;
    ``initialize=False`` skips random init (weights are loaded next; frozen models only: megatron sets the
    weights' tensor-parallel attributes on the init path). ``config_overrides``: ``TransformerConfig``
    fields of the run (sequence parallelism, recompute: ``ParallelConfig.activation_overrides``)."""
    kwargs = dict(calculate_per_token_loss=True, perform_initialization=initialize, **config_overrides)
    if kind == "value":
        from c2f_megatron.models.value_head import build_value_model_chunks

        return build_value_model_chunks(model_cfg, layout=layout, **kwargs)
    from c2f_megatron.models.gpt import build_model_chunks

    return build_model_chunks(model_cfg, layout=layout, **kwargs)


@dataclass
class RoleModel:
    name: str
    kind: Kind
    model_cfg: ModelConfig
    layout: RoleLayout
    chunks: list[torch.nn.Module]
    loaded_from: CheckpointMetadata | None = None
    optimizer: Any = None
    scheduler: Any = None
    offload: bool = False
    _device: torch.device | None = field(default=None, repr=False)

    # -------------------------------------------------------------------------------------- building

    @classmethod
    def build(
        cls,
        name: str,
        kind: Kind,
        model_cfg: ModelConfig,
        layout: RoleLayout | None = None,
        *,
        init_from: str | Path | None = None,
        optim: OptimConfig | None = None,
        train_steps: int = 0,
        offload: bool = False,
        initialize: bool | None = None,
        config_overrides: dict[str, Any] | None = None,
    ) -> RoleModel:
        """``kind``'s chunks of ``model_cfg`` on ``layout`` (default megatron's global one), loaded from
        ``init_from`` when given; trained (DDP, optimizer, scheduler) when ``optim`` is given, else frozen.
        ``initialize``: random init (default: when nothing is loaded; False when the caller copies weights
        in). A trained model is always initialized: megatron sets the tensor-parallel attributes of its
        weights (``tensor_model_parallel``, which the grad norm and clipping read) only on that path.

        A layout the model cannot take (TP not dividing the heads, ...) is reported with the role's config
        section (``parallel`` for the global layout, ``<name>.parallel`` otherwise)."""
        layout = layout or global_layout(name)
        try:
            init = optim is not None or (init_from is None if initialize is None else initialize)
            chunks = build_chunks(kind, model_cfg, layout, initialize=init, **(config_overrides or {}))
        except ValueError as exc:
            section = "parallel" if layout.is_global else f"{layout.name}.parallel"
            raise ValueError(f"{section} ({layout.describe()}): {exc}") from exc
        meta = load_weights(kind, chunks, init_from) if init_from is not None else None
        role = cls(name, kind, model_cfg, layout, chunks, meta)
        if optim is not None:
            role.chunks, role.optimizer, role.scheduler = schedule.setup_training(
                chunks, optim, model_cfg, train_steps, layout
            )
        else:
            role.freeze(offload)
        return role

    @classmethod
    def from_checkpoint(
        cls,
        name: str,
        kind: Kind,
        path: str | Path,
        layout: RoleLayout | None = None,
        *,
        runtime: dict[str, Any] | None = None,
        optim: OptimConfig | None = None,
        train_steps: int = 0,
        offload: bool = False,
        config_overrides: dict[str, Any] | None = None,
    ) -> RoleModel:
        """A model whose architecture is the checkpoint's own (``runtime`` may change only
        ``RUNTIME_FIELDS``), loaded from it."""
        runtime = runtime or {}
        fixed = sorted(set(runtime) - set(RUNTIME_FIELDS))
        if fixed:
            raise ValueError(
                f"{name}: {fixed} cannot change when loading {path}; only {list(RUNTIME_FIELDS)} can"
            )
        model_cfg = dataclasses.replace(read_metadata(path).model, **runtime)
        return cls.build(
            name,
            kind,
            model_cfg,
            layout,
            init_from=path,
            optim=optim,
            train_steps=train_steps,
            offload=offload,
            config_overrides=config_overrides,
        )

    def freeze(self, offload: bool = False) -> None:
        """No gradients, eval mode; with ``offload`` (GPU only) the weights wait on the CPU between uses."""
        from c2f_megatron.platform.distributed import device

        self._device = device()
        self.offload = offload and self._device.type != "cpu"
        for c in self.chunks:
            c.requires_grad_(False)
            c.eval()
        self._move("cpu")

    def copy_weights_from(self, other: RoleModel) -> None:
        """This model's shards set to ``other``'s (same architecture and layout)."""
        for mine, theirs in zip(self.chunks, other.chunks):
            unwrap_model(mine).load_state_dict(unwrap_model(theirs).state_dict())

    # ------------------------------------------------------------------------------------------ views

    @property
    def trained(self) -> bool:
        return self.optimizer is not None

    @property
    def module(self) -> torch.nn.Module:
        """The bare megatron model of the (single) chunk, e.g. for the KV-cached rollout."""
        if len(self.chunks) != 1:
            raise ValueError(f"{self.name}: needs one model chunk, has {len(self.chunks)} (virtual pipeline)")
        return unwrap_model(self.chunks[0])

    def metadata(self, tokenizer: dict[str, Any] | None, provenance: dict[str, Any], **extra: Any):
        """The c2f metadata a checkpoint of this model records."""
        return CheckpointMetadata(
            self.model_cfg, tokenizer, self.kind, self.model_cfg.params_dtype, provenance, dict(extra)
        )

    # ------------------------------------------------------------------------------------ schedules

    def _move(self, where: str | torch.device) -> None:
        if self.offload:
            for c in self.chunks:
                c.to(where)

    @contextlib.contextmanager
    def on_device(self):
        """The chunks on the device for the block (a no-op unless offloaded)."""
        self._move(self._device)
        try:
            yield self.chunks
        finally:
            self._move("cpu")
            if self.offload:
                torch.cuda.empty_cache()

    def forward_only(
        self, forward_step: Any, microbatches: Sequence[Any], seq_length: int, micro_batch_size: int
    ) -> list[Any]:
        """megatron's schedule for this layout, forward only, eval mode (restored after); returns the last
        stage's per-micro-batch outputs (empty elsewhere)."""
        with self.on_device() as chunks:
            modes = [c.training for c in chunks]
            for c in chunks:
                c.eval()
            try:
                with torch.no_grad():
                    return schedule.run_schedule(
                        chunks, self.layout, forward_step, microbatches, seq_length, micro_batch_size, True
                    )
            finally:
                for c, mode in zip(chunks, modes):
                    c.train(mode)

    def train_step(
        self,
        forward_step: Any,
        microbatches: Sequence[Any],
        seq_length: int,
        micro_batch_size: int,
        loss_key: str = "loss",
    ) -> schedule.StepResult:
        """One optimizer step over ``microbatches`` (the NaN guard of ``schedule.train_step`` included)."""
        if not self.trained:
            raise ValueError(f"{self.name}: a frozen model has no optimizer step")
        return schedule.train_step(
            self.chunks,
            self.optimizer,
            self.scheduler,
            self.layout,
            forward_step,
            microbatches,
            seq_length,
            micro_batch_size,
            loss_key,
        )

    def evaluate(
        self, forward_step: Any, batches: Sequence[Sequence[Any]], seq_length: int, micro_batch_size: int
    ) -> dict[str, float]:
        """Forward-only metrics pooled over groups of micro-batches."""
        return schedule.evaluate(
            self.chunks, forward_step, batches, seq_length, micro_batch_size, self.layout
        )
