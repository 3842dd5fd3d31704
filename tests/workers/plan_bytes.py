"""Weight, gradient and optimizer bytes of a trained tiny model: as ``c2f plan`` counts them on the meta
device (``--plan``), or as the tensors a real CPU run allocates after one optimizer step (every unique
storage reachable from the model, megatron's DDP buffers and the optimizer, one rank each)."""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from c2f_megatron.engine.config import OptimConfig
from c2f_megatron.models.config import get_preset


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def real(cfg, optim: OptimConfig) -> dict:
    import torch

    from c2f_megatron.engine.role_model import RoleModel
    from c2f_megatron.platform import ParallelConfig, destroy_distributed, device, init_distributed
    from c2f_megatron.training.tasks.lm import token_forward_step

    init_distributed(ParallelConfig(seed=1))
    role = RoleModel.build("model", "gpt", cfg, optim=optim, train_steps=2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen).to(device())
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(2, 16, device=device())}
    result = role.train_step(partial(token_forward_step, cfg.vocab_size), [batch], 16, 2)
    assert not result.skipped
    buffers = [b for c in role.chunks for b in c.buffers]
    params = [p for c in role.chunks for p in c.parameters()]
    weights = _storages(params)
    grads = _storages(b.grad_data for b in buffers)
    opts = getattr(role.optimizer, "chained_optimizers", [role.optimizer])
    held = []
    for opt in opts:
        inner = opt.optimizer
        held += [p for g in inner.param_groups for p in g["params"]]
        held += [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]
    optimizer = {k: v for k, v in _storages(held).items() if k not in weights and k not in grads}
    out = {
        "weights": sum(weights.values()),
        "grads": sum(grads.values()),
        "optimizer": sum(optimizer.values()),
    }
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, out)
    destroy_distributed()
    return {k: [g[k] for g in gathered] for k in out}


def planned(cfg, optim: OptimConfig, dp: int) -> dict:
    from c2f_megatron.plan.shards import role_shards

    (rank,) = role_shards("gpt", cfg, 1, 1, dp, optim=optim, with_keys=False).ranks
    return {"weights": rank.weight_bytes, "grads": rank.grad_bytes, "optimizer": rank.optimizer_bytes}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--plan", action="store_true")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--distributed", action="store_true")
    args = p.parse_args()
    # an odd vocab and hidden size so that the distributed optimizer's bucket padding is exercised
    cfg = get_preset("mistral-nano", params_dtype=args.dtype, layer_spec="sdpa", vocab_size=1001)
    optim = OptimConfig(lr=1e-3, use_distributed_optimizer=args.distributed)
    out = planned(cfg, optim, args.dp) if args.plan else real(cfg, optim)
    import torch.distributed as dist

    if args.plan or not dist.is_initialized() or dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
