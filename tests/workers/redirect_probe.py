"""Exercise the megatron code path behind each CPU redirection, with or without that redirection.

One case applies every redirection and runs every probe; one case per redirection applies all but that one
and runs its probe. Prints one JSON object: case -> {probe name -> "ok" or the error it raised}.
"""

from __future__ import annotations

import json
import multiprocessing

import torch
import torch.distributed as dist

from c2f_megatron.platform import megatron_cpu


def probe_current_device() -> None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)(8)


def probe_rng_tracker() -> None:
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123, force_reset_rng=True)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        again = torch.rand(4)
    assert not torch.equal(inside, again), "the tracked state must advance across forks"


def probe_cuda_factories() -> None:
    from megatron.core.transformer.utils import get_default_causal_mask, get_sliding_window_causal_mask

    assert get_default_causal_mask(4).device.type == "cpu"
    get_sliding_window_causal_mask(4, 4, (1, 0))


def probe_synchronize() -> None:
    torch.cuda.synchronize()  # what p2p_communication (batch_p2p_sync) and inference utils call


def probe_type_checks() -> None:
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=2.0)
    assert torch.allclose(p.grad, torch.full((3,), 0.5), atol=1e-6)
    q = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    Float16OptimizerWithFloat16Params(
        torch.optim.Adam([q]), OptimizerConfig(bf16=True, lr=1e-3), grad_scaler=None, init_state_fn=None
    )


def probe_tensor_cuda() -> None:
    torch.zeros(2).cuda()


def probe_inference() -> None:
    from megatron.core.inference import communication_utils

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    assert start.elapsed_time(end) >= 0.0
    communication_utils._is_cuda(torch.zeros(1))


PROBES = {
    "current_device": probe_current_device,
    "rng_tracker": probe_rng_tracker,
    "cuda_factories": probe_cuda_factories,
    "synchronize": probe_synchronize,
    "type_checks": probe_type_checks,
    "tensor_cuda": probe_tensor_cuda,
    "inference": probe_inference,
}


def run_case(without: str | None) -> dict[str, str]:
    """In this (fresh, forked) process: apply every redirection but ``without``, then run the probes."""
    names = tuple(n for n in megatron_cpu.CPU_REDIRECTS if n != without)
    megatron_cpu.apply(cpu=True, only=names)

    from megatron.core import parallel_state

    from tests.launch import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    results = {}
    for name in PROBES if without is None else [without]:
        try:
            PROBES[name]()
            results[name] = "ok"
        except Exception as exc:  # the point: report what megatron raises without the redirection
            results[name] = f"{type(exc).__name__}: {exc}"[:300]
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return results


def _child(without: str | None, queue) -> None:
    queue.put(run_case(without))


def main() -> None:
    """Every case in its own forked child: the redirections are process-global, megatron is imported once."""
    assert set(PROBES) == set(megatron_cpu.CPU_REDIRECTS), "every redirection needs a probe"
    import megatron.core.optimizer  # noqa: F401  (import once, before forking)

    ctx = multiprocessing.get_context("fork")
    report: dict[str, dict[str, str]] = {}
    for without in [None, *PROBES]:
        queue = ctx.Queue()
        child = ctx.Process(target=_child, args=(without, queue))
        child.start()
        result = queue.get(timeout=300)
        child.join()
        report["all" if without is None else f"without:{without}"] = result
    print(json.dumps(report))


if __name__ == "__main__":
    main()
