"""The engine: a model on a parallel layout (``RoleModel``), megatron's schedules on it, its initial weights,
and per-row results over batches every rank holds. Trainers, PPO roles, evaluation and the merge run
their models through it; what each computes from the outputs stays with them (verl's engine/role split).

- ``role_model``: ``RoleModel`` (build / from_checkpoint, forward_only, train_step, evaluate, offload);
- ``schedule``: DDP, optimizer, scheduler, schedule hooks, the train step and its NaN guard;
- ``weights``: which checkpoint parts load into which chunks (an LM's backbone into a value model);
- ``rows``: forward and train over a batch every rank holds, each layout on its own DP slice;
- ``config``: ``OptimConfig``.
"""

from c2f_megatron.engine.config import OptimConfig
from c2f_megatron.engine.role_model import RoleModel, build_chunks
from c2f_megatron.engine.schedule import StepResult

__all__ = ["OptimConfig", "RoleModel", "StepResult", "build_chunks"]
