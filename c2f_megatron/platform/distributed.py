"""Process-group and megatron ``parallel_state`` set-up from torchrun or Slurm, on CUDA+NCCL or CPU+gloo.

One call, ``init_distributed``, does what every c2f entry point needs before it builds a model: read the
launcher's environment, pick the device and backend, initialise ``torch.distributed`` and megatron's
TP/PP/DP groups, seed every RNG the way Megatron-LM does, install the CPU redirections when there is no
GPU, and register the teardown (``destroy_process_group`` at exit; a 4-process gloo job once aborted
without it).
"""

from __future__ import annotations

import atexit
import datetime
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from c2f_megatron.platform.adam_fallback import apply as apply_adam_fallback
from c2f_megatron.platform.megatron_cpu import apply as apply_cpu_redirections

# The changes to megatron-core this process needs, by name: the CPU redirections (nothing on a GPU), and
# the torch-Adam fallback fixes of the distributed optimizer (any machine without TE / apex FusedAdam).
PATCH_SETS: dict[str, Any] = {
    "megatron_cpu": lambda cuda: apply_cpu_redirections(cpu=not cuda),
    "adam_fallback": lambda cuda: apply_adam_fallback(),
}


@dataclass
class ParallelConfig:
    """How one model is laid out over the ranks; data parallel size is what is left of the world."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    seed: int = 1234
    # Activation memory of the trained models (megatron's options of the same names). Sequence
    # parallelism splits the norms, dropouts and residuals over the TP ranks along the sequence (TP > 1);
    # recompute "selective" recomputes core attention in the backward pass, "full" whole layers
    # (``recompute_method`` uniform: groups of ``recompute_num_layers`` layers, block: the first
    # ``recompute_num_layers`` layers of each stage).
    sequence_parallel: bool = False
    recompute_granularity: Literal["selective", "full"] | None = None
    recompute_method: Literal["uniform", "block"] = "uniform"
    recompute_num_layers: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "recompute_num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp < 1:
            raise ValueError(f"virtual_pipeline_model_parallel_size must be >= 1 or null, got {vpp}")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ValueError(
                f"recompute_granularity must be selective, full or null, got {self.recompute_granularity!r}"
            )
        if self.recompute_method not in ("uniform", "block"):
            raise ValueError(f"recompute_method must be uniform or block, got {self.recompute_method!r}")

    def activation_overrides(self, tp: int | None = None) -> dict[str, Any]:
        """The ``TransformerConfig`` fields of a trained model at TP ``tp`` (default this layout's) for
        these options; none when all are off (sequence parallelism needs TP > 1)."""
        out: dict[str, Any] = {}
        if self.sequence_parallel and (tp or self.tensor_model_parallel_size) > 1:
            out["sequence_parallel"] = True
        if self.recompute_granularity is not None:
            out["recompute_granularity"] = self.recompute_granularity
            if self.recompute_granularity == "full":
                out["recompute_method"] = self.recompute_method
                out["recompute_num_layers"] = self.recompute_num_layers
        return out


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process: its rank and how to reach rank 0."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm hostlist such as ``gpu[003-005,010],cpu01`` (what ``scontrol show hostnames``
    prints first)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Rank/world/master from torchrun (``RANK``, ``WORLD_SIZE``...) or from ``srun`` (``SLURM_PROCID``...).

    torchrun's variables win when both are present (torchrun inside an sbatch allocation).
    """
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        master = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=master,
            master_port=int(env.get("MASTER_PORT", 10000 + job_id % 20000)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0) or _free_port()), "single")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_cuda() -> bool:
    """CUDA+NCCL when a GPU is visible, CPU+gloo otherwise; ``C2F_DEVICE=cpu`` forces the CPU."""
    return os.environ.get("C2F_DEVICE", "").lower() != "cpu" and torch.cuda.is_available()


_META = False  # inside ``platform.meta.fake_rank``: models are built on the meta device


def device() -> torch.device:
    """The device this rank computes on (``meta`` while ``platform.meta.fake_rank`` plans a job)."""
    if _META:
        return torch.device("meta")
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda() else torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Megatron-LM's seeding: offset by pipeline rank, then the model-parallel RNG tracker (TP-aware)."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if parallel_state.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_distributed(parallel: ParallelConfig, timeout_minutes: int = 30) -> LaunchEnv:
    """Initialise torch.distributed and megatron's parallel groups; idempotent within a process.

    Asked for another TP/PP/VPP layout than the current one, it replaces megatron's groups (models built
    on the old groups must not be used after that): one launch can check several layouts in turn.
    """
    from megatron.core import parallel_state

    launch = read_launch_env()
    cuda = use_cuda()
    for patch_set in PATCH_SETS.values():
        patch_set(cuda)
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if launch.world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {launch.world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}); launch a multiple of {tp * pp} processes"
        )
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        atexit.register(destroy_distributed)
    vpp = parallel.virtual_pipeline_model_parallel_size
    if parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    ) != (tp, pp, vpp):
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
        )
    seed_everything(parallel.seed)
    return launch


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        # No barrier: after an error on one rank, a barrier here would block forever while the other
        # ranks sit in their own collective; destroy_process_group alone lets every rank exit.
        dist.destroy_process_group()


def is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
