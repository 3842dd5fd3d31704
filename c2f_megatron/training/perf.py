"""How fast and how big a job's phases are: model FLOPs (and MFU on a GPU), phase timers, peak memory.

The FLOPs formula lives here once. Per token of a sequence ``s`` tokens long it is PaLM's accounting (what
``benchmarks/train_step.py`` prints): ``c * N + a * L * d * s`` with ``N`` the weights that multiply
(the transformer's matmul weights plus the output layer; not the input embedding or the norms), ``L``
layers, ``d`` the attention width (heads x head dim), ``c = 6, a = 12`` when trained (forward and backward)
and ``c = 2, a = 4`` for a forward only (scores and context, full ``s`` for every token: causal masking is
not discounted). A value model's output layer is its ``[hidden] -> 1`` head. MFU is those FLOPs per second
per device over the device's peak dense bf16 FLOP/s (``PEAK_FLOPS``), on a GPU we know only.

Peak memory is what the allocator saw: on a GPU ``torch.cuda.max_memory_allocated`` with the peak reset when
a phase starts (``PhaseTimer``); on the CPU only the process's peak resident set since it started
(``getrusage``), which no phase can reset.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from c2f_megatron.models.config import ModelConfig

# Peak dense bf16 FLOP/s of one device, by a part of ``torch.cuda.get_device_name()``; the first match wins,
# so a more specific name comes first. A device not listed gets no MFU.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("GH200", 989e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
)
GB = 1024**3


def peak_flops(device_name: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of ``device_name`` (default: this process's GPU); None on the CPU or for a
    device not in ``PEAK_FLOPS``."""
    if device_name is None:
        from c2f_megatron.platform.distributed import use_cuda

        if not use_cuda():
            return None
        device_name = torch.cuda.get_device_name()
    return next((flops for part, flops in PEAK_FLOPS if part in device_name), None)


def matmul_weights(model_cfg: ModelConfig, lm_head: bool = True) -> int:
    """The weights a token multiplies through: attention and MLP of every layer plus the output layer
    (the vocabulary projection; ``lm_head=False``: a value model's scalar head)."""
    h, ffn = model_cfg.hidden_size, model_cfg.ffn_hidden_size
    q = model_cfg.num_attention_heads * model_cfg.head_dim
    kv = model_cfg.num_query_groups * model_cfg.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * ffn  # Q, K, V, output projection; SwiGLU's three
    return model_cfg.num_layers * per_layer + (model_cfg.vocab_size * h if lm_head else h)


def flops_per_token(model_cfg: ModelConfig, seq: int, training: bool, lm_head: bool = True) -> float:
    """Model FLOPs of one token of a ``seq``-token sequence (the module docstring's formula)."""
    c, a = (6.0, 12.0) if training else (2.0, 4.0)
    width = model_cfg.num_attention_heads * model_cfg.head_dim
    return c * matmul_weights(model_cfg, lm_head) + a * model_cfg.num_layers * width * seq


def sequence_flops(
    model_cfg: ModelConfig, lengths: Sequence[int], training: bool, lm_head: bool = True
) -> float:
    """Model FLOPs of one pass over sequences of ``lengths`` real tokens each."""
    return sum(n * flops_per_token(model_cfg, n, training, lm_head) for n in lengths)


def mfu(flops: float, seconds: float, devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation of ``devices`` that did ``flops`` in ``seconds``; None without a peak."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / devices / peak


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def mfu_metrics(
    flops: dict[str, float], seconds: dict[str, float], total_seconds: float, peak: float | None
) -> dict[str, float]:
    """``mfu`` of all ``flops`` over ``total_seconds`` and ``mfu_<phase>`` of each phase with FLOPs and a
    time, over every rank of the job; empty without a ``peak`` (the CPU, an unknown GPU)."""
    if peak is None:
        return {}
    world = world_size()
    out = {"mfu": mfu(sum(flops.values()), total_seconds, world, peak)}
    for name, f in flops.items():
        if f > 0 and seconds.get(name, 0.0) > 0:
            out[f"mfu_{name}"] = mfu(f, seconds[name], world, peak)
    return out


def memory_metrics(timer: PhaseTimer) -> dict[str, float]:
    """The most any rank held: ``peak_mem_<phase>_gb`` per timed phase and ``peak_mem_gb`` over them (GPU:
    allocated), or ``peak_rss_gb`` (CPU: the process's peak RSS since it started). A collective: every rank
    calls it with the same phases."""
    from c2f_megatron.platform.distributed import device

    names = sorted(timer.peak_gb)
    values = [timer.peak_gb[n] for n in names] if names else [peak_rss_gb()]
    memory = torch.tensor(values, dtype=torch.float64, device=device())
    if world_size() > 1:
        torch.distributed.all_reduce(memory, op=torch.distributed.ReduceOp.MAX)
    if not names:
        return {"peak_rss_gb": float(memory[0])}
    out = {f"peak_mem_{n}_gb": float(v) for n, v in zip(names, memory)}
    out["peak_mem_gb"] = float(memory.max())
    return out


def peak_rss_gb() -> float:
    """This process's peak resident set since it started (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GB if sys.platform == "darwin" else peak / (1024**2)


class PhaseTimer:
    """Seconds (summed over repeats) and, on a GPU, peak allocated memory (max over repeats) of named
    phases. A phase waits for the GPU at its start and end, so its time is the work's, not a launch's."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = {}
        self.peak_gb: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / GB
                self.peak_gb[name] = max(self.peak_gb.get(name, 0.0), peak)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
