"""Run megatron-core 0.16.1 on a CPU-only machine (gloo), applied from outside site-packages.

megatron-core assumes CUDA in a handful of places. On a machine without a GPU each of them either raises
or (worse) silently misbehaves. This module redirects them, once per process, without editing any file in
site-packages. Every redirection names the megatron place it fixes, and ``tests/test_megatron_cpu.py``
holds a test per redirection that fails without it. The measured list lives in
``shared/docs/megatron-core-0.16.1-on-cpu.md``; numbers below refer to that list.

On a CUDA machine ``apply()`` changes nothing; the torch-Adam fallback of the distributed optimizer (items
11-13, taken on any GPU without Transformer Engine or apex) is ``adam_fallback``'s, and
``distributed.init_distributed`` applies both sets.

Kinds of redirection used, narrowest first:
- *module torch proxy*: a module's global ``torch`` is replaced by a proxy whose tensor factories map
  ``device="cuda"`` to the CPU and drop ``pin_memory`` (items 3, 4, 6);
- *function replacement*: one megatron function or method replaced by a CPU-correct twin (items 2, 16);
- *source rewrite*: a method recompiled from its own source with exact, asserted string replacements
  (items 7, 8: ``'torch.cuda.FloatTensor'`` type checks), so a megatron upgrade fails loudly, not silently;
- *CPU-only torch.cuda shims*: ``torch.cuda.current_device`` -> CPU device, ``synchronize`` no-op,
  ``Event`` with wall-clock timing, ``Tensor.cuda`` -> identity (items 1, 5, 10, 15). These calls can only
  raise on a machine without CUDA, so giving them a CPU meaning cannot change any CUDA behaviour.
"""

from __future__ import annotations

import functools
import importlib
import logging
import time
import types
from collections.abc import Callable
from typing import Any

import torch

from c2f_megatron.platform.patching import check_megatron_version, rewrite_function

logger = logging.getLogger(__name__)

_APPLIED: set[str] = set()

_FACTORIES = (
    "tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "as_tensor",
)


def _is_cuda_device(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare CUDA ordinal


class LocalDeviceTorch(types.ModuleType):
    """A stand-in for the ``torch`` module whose tensor factories never place tensors on CUDA.

    Installed as the ``torch`` global of the few megatron modules that hard-code ``device="cuda"``
    (masks, pipeline schedules, optimizer scalars); everything else is forwarded to torch unchanged.
    """

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, self._wrap(getattr(torch, name)))

    @staticmethod
    def _wrap(factory: Callable) -> Callable:
        @functools.wraps(factory)
        def call(*args: Any, **kwargs: Any) -> Any:
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = torch.device("cpu")
            kwargs.pop("pin_memory", None)
            return factory(*args, **kwargs)

        return call

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class WallClockEvent:
    """CPU twin of ``torch.cuda.Event`` for megatron's inference timing (item 15)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: WallClockEvent) -> float:
        if self._t is None or end._t is None:
            raise RuntimeError("WallClockEvent.elapsed_time called before both events were recorded")
        return (end._t - self._t) * 1000.0


# --------------------------------------------------------------------------------------------- items


def _redirect_current_device() -> None:
    """Item 1: ``torch.cuda.current_device()`` is used as the allocation device for rotary tables,
    parameters, p2p and DDP buffers. On a CPU-only machine, the current device is the CPU."""
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]


def _redirect_rng_tracker() -> None:
    """Item 2: the model-parallel RNG tracker stores and swaps CUDA generator states. On CPU it tracks
    the CPU generator instead, so dropout regions and seeding keep megatron's TP/DP seed semantics."""
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    def add(self: Any, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state
    mp_random.CudaRNGStatesTracker.add = add


def _redirect_cuda_factories() -> None:
    """Items 3, 4, 6: masks, the three forward_backward schedules and optimizer/clip-grad scalars
    allocate with ``device="cuda"``. Those modules get a ``torch`` whose factories use the CPU."""
    proxy = LocalDeviceTorch()
    for name in (
        "megatron.core.transformer.utils",
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.optimizer.optimizer",
        "megatron.core.optimizer.clip_grads",
        "megatron.core.optimizer.grad_scaler",
        "megatron.core.utils",
    ):
        importlib.import_module(name).torch = proxy


def _redirect_synchronize() -> None:
    """Item 5: p2p communication (``batch_p2p_sync``) and inference communication call
    ``torch.cuda.synchronize()``; with no CUDA there is nothing to wait for."""
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]


def _redirect_type_checks() -> None:
    """Items 7, 8: the mixed-precision/distributed optimizers and grad clipping accept only
    ``torch.cuda.*Tensor`` parameters. On CPU the same checks must accept the CPU tensor types."""
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    cpu_types = {
        "'torch.cuda.FloatTensor'": "'torch.FloatTensor'",
        "['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']": "['torch.HalfTensor', 'torch.BFloat16Tensor']",
    }
    rewrite_function(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups", cpu_types)
    rewrite_function(
        distrib_optimizer.DistributedOptimizer,
        "__init__",
        {
            "['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']": "['torch.HalfTensor', 'torch.BFloat16Tensor']"
        },
    )
    rewrite_function(optimizer.Float16OptimizerWithFloat16Params, "__init__", cpu_types)
    rewrite_function(
        clip_grads, "clip_grad_by_total_norm_fp32", {"'torch.cuda.FloatTensor'": "'torch.FloatTensor'"}
    )


def _redirect_tensor_cuda() -> None:
    """Item 10: ``Tensor.cuda()`` in ``get_parameter_state_dp_zero`` (and optimizer state reloads).
    With no CUDA, moving to "the accelerator" means staying on the CPU."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[assignment]


def _redirect_inference() -> None:
    """Items 15, 16: inference timing uses ``torch.cuda.Event`` and PP broadcasts assert ``is_cuda``."""
    from megatron.core.inference import communication_utils

    torch.cuda.Event = WallClockEvent  # type: ignore[assignment,misc]

    def is_local(tensor: torch.Tensor) -> None:
        assert tensor is not None

    communication_utils._is_cuda = is_local


def _check_undeclared_dependencies() -> None:
    """Items 9, 17: psutil (a dist-checkpoint save without it hangs forever) and tqdm (static inference
    engine) are needed but not declared by megatron-core."""
    missing = []
    for name in ("psutil", "tqdm"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"megatron-core needs {', '.join(missing)} at run time but does not declare it; "
            f"install with: pip install {' '.join(missing)}"
        )


CPU_REDIRECTS: dict[str, Callable[[], None]] = {
    "current_device": _redirect_current_device,
    "rng_tracker": _redirect_rng_tracker,
    "cuda_factories": _redirect_cuda_factories,
    "synchronize": _redirect_synchronize,
    "type_checks": _redirect_type_checks,
    "tensor_cuda": _redirect_tensor_cuda,
    "inference": _redirect_inference,
}


def apply(cpu: bool | None = None, only: tuple[str, ...] | None = None) -> list[str]:
    """Install the CPU redirections for this process (idempotent). Returns the names applied now.

    ``cpu`` defaults to ``not torch.cuda.is_available()``; on a CUDA machine nothing is redirected.
    ``only`` restricts to some names (tests use it to show that each redirection is needed).
    """
    if cpu is None:
        cpu = not torch.cuda.is_available()
    _check_undeclared_dependencies()
    check_megatron_version()
    applied = []
    if cpu:
        for name, fix in CPU_REDIRECTS.items():
            if (only is None or name in only) and name not in _APPLIED:
                fix()
                _APPLIED.add(name)
                applied.append(name)
    if applied:
        logger.debug("megatron CPU redirections applied: %s", ", ".join(applied))
    return applied
