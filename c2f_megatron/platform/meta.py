"""Any rank of any job, in this one process, on the meta device: how ``c2f plan`` counts real shards.

``fake_rank(rank, world, tp, pp)`` makes this process rank ``rank`` of a ``world``-rank job over torch's
*fake* process group (every collective returns at once and moves nothing), sets up megatron's
``parallel_state`` for that layout, and sends every allocation to the meta device: tensors created under
``torch.device("meta")``, ``platform.distributed.device()``, and megatron's own allocations on
``torch.cuda.current_device()`` (the DDP parameter and gradient buffers). A model built inside is
megatron's real ``GPTModel`` for that rank, with its real shapes and sharded state dict, and no memory.
megatron's gloo groups are not created: the fake backend cannot make them, and nothing here needs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from c2f_megatron.platform import distributed as _distributed


@contextlib.contextmanager
def fake_rank(rank: int, world: int, tp: int, pp: int, vpp: int | None = None) -> Iterator[None]:
    """The block runs as ``rank`` of ``world`` at TP ``tp`` x PP ``pp`` (x VPP) on the meta device."""
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("fake_rank needs a process without a process group (c2f plan runs alone)")
    for patch_set in _distributed.PATCH_SETS.values():
        patch_set(False)  # the CPU redirections: megatron's CUDA-only calls become harmless
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("meta")  # type: ignore[assignment]
    _distributed._META = True
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            create_gloo_process_groups=False,
        )
        with torch.device("meta"):
            yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        _distributed._META = False
        torch.cuda.current_device = current_device  # type: ignore[assignment]
