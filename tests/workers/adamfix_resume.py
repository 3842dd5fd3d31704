"""DP=2 distributed-optimizer kill-and-resume on megatron's torch-Adam fallback, with and without each fix.

``torchrun --nproc_per_node=2 adamfix_resume.py OUT_DIR SCENARIO [SCENARIO ...]``; a scenario is "all",
"none" or "-NAME" (every ``adam_fallback.FIXES`` entry but NAME).

One uninterrupted run of STEPS steps, with stock megatron (no fix installed: saving a non-empty optimizer
state is unaffected by the fixes), saves a training checkpoint after step KILL_AT in each sharding format.
Then, per scenario, DistributedOptimizer's methods are reset to megatron's originals, that scenario's fixes
are installed, and per format a fresh model and optimizer (what a restarted process has) load the
checkpoint and train steps KILL_AT+1..STEPS. Rank 0 prints ``RESULT {json}``: both runs' losses, the
per-parameter Adam steps after the load, or the error the resume raised.
"""

import json
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from c2f_megatron.checkpoint.megatron_dir import CheckpointMetadata
from c2f_megatron.engine import OptimConfig, RoleModel
from c2f_megatron.platform import adam_fallback
from c2f_megatron.platform.distributed import device, init_distributed
from c2f_megatron.training import checkpointing
from c2f_megatron.training.config import ModelSection, ParallelConfig
from c2f_megatron.training.tasks.lm import collate_windows, token_forward_step

VOCAB, SEQ, MICRO = 128, 16, 2
STEPS, KILL_AT = 5, 2
FORMATS = ("dp_reshardable", "fully_reshardable")


def batch(step: int, dp_rank: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    return [collate_windows(torch.randint(3, VOCAB, (MICRO, SEQ + 1), generator=g).tolist(), device())]


def train(tm, steps: range) -> dict[int, float]:
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    fwd = partial(token_forward_step, VOCAB)
    return {s: tm.train_step(fwd, batch(s, dp_rank), SEQ, MICRO).metrics["loss"] for s in steps}


def per_param_steps(optimizer) -> dict[str, object]:
    """The torch-Adam ``step`` of every parameter state on this rank: values, distinct tensors, count."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    steps = [s["step"] for o in opts for s in o.optimizer.state.values() if "step" in s]
    return {
        "values": sorted({float(t) for t in steps}),
        "tensors": len({id(t) for t in steps}),
        "n": len(steps),
    }


class Methods:
    """megatron's own DistributedOptimizer methods, to reinstall between scenarios."""

    def __init__(self) -> None:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        self.owner = DistributedOptimizer
        self.originals = {n: DistributedOptimizer.__dict__[n] for n in adam_fallback.PATCHED_METHODS}

    def current(self) -> dict[str, object]:
        return {n: self.owner.__dict__[n] for n in adam_fallback.PATCHED_METHODS}

    def reset(self) -> None:
        for name, method in self.originals.items():
            setattr(self.owner, name, method)
        adam_fallback._APPLIED.clear()


def install(methods: Methods, scenario: str) -> dict[str, object]:
    """Reset to megatron's methods, then apply the scenario's fixes (checking apply()'s contract)."""
    from megatron.core.optimizer import distrib_optimizer

    methods.reset()
    if scenario == "none":
        return {"applied": None}
    only = None if scenario == "all" else tuple(n for n in adam_fallback.FIXES if n != scenario.lstrip("-"))
    info: dict[str, object] = {}
    distrib_optimizer.HAVE_APEX_OR_TE = True  # as with TE / apex FusedAdam: apply() must do nothing
    try:
        info["with_fused_adam"] = adam_fallback.apply(only=only)
        info["with_fused_adam_untouched"] = methods.current() == methods.originals
    finally:
        distrib_optimizer.HAVE_APEX_OR_TE = False
    info["applied"] = adam_fallback.apply(only=only)
    first = methods.current()
    adam_fallback.apply(only=only)
    info["idempotent"] = methods.current() == first
    return info


def main(out: str, scenarios: list[str]) -> None:
    start = time.perf_counter()
    out_dir = Path(out)
    methods = Methods()  # megatron's own methods, captured before init_distributed installs the fixes
    init_distributed(ParallelConfig())
    methods.reset()  # the reference run uses stock megatron (saving a non-empty state needs no fix)
    # This worker exercises megatron's own behaviour: the trainer's refusal to resume is lifted here.
    checkpointing._check_optimizer_resumable = lambda optimizer: None

    model_cfg = ModelSection(
        overrides=dict(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=64,
            vocab_size=VOCAB,
            layer_spec="local",
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
    ).resolve()
    optim = OptimConfig(
        lr=1e-2, weight_decay=0.1, warmup_steps=0, decay_style="constant", use_distributed_optimizer=True
    )
    meta = CheckpointMetadata(model=model_cfg)

    tm = RoleModel.build("model", "gpt", model_cfg, optim=optim, train_steps=STEPS)
    reference = train(tm, range(1, KILL_AT + 1))
    for fmt in FORMATS:
        state = checkpointing.TrainerState(step=KILL_AT, scheduler=tm.scheduler.state_dict())
        models = [checkpointing.ModelState(tm.chunks, meta, tm.optimizer)]
        checkpointing.save_training_checkpoint(out_dir / fmt, models, state, sharding_type=fmt)
    report: dict[str, object] = {"steps_at_save": per_param_steps(tm.optimizer)}
    reference.update(train(tm, range(KILL_AT + 1, STEPS + 1)))
    report["reference"] = reference

    for scenario in scenarios:
        result: dict[str, object] = {"install": install(methods, scenario)}
        for fmt in FORMATS:
            resumed: dict[str, object] = {}
            try:
                fresh = RoleModel.build("model", "gpt", model_cfg, optim=optim, train_steps=STEPS)
                models = [checkpointing.ModelState(fresh.chunks, meta, fresh.optimizer)]
                ckpt = checkpointing.step_dir(out_dir / fmt, KILL_AT)
                state = checkpointing.load_training_checkpoint(ckpt, models)
                fresh.scheduler.load_state_dict(state.scheduler)
                resumed["steps_after_load"] = per_param_steps(fresh.optimizer)
                resumed["losses"] = train(fresh, range(state.step + 1, STEPS + 1))
                resumed["steps_at_end"] = per_param_steps(fresh.optimizer)
                resumed["is_applied"] = adam_fallback.is_applied()
            except Exception as exc:  # noqa: BLE001 - the failure is what the test looks at
                resumed["error"] = f"{type(exc).__name__}: {exc}"[:300]
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                resumed["where"] = f"{frame.name}: {frame.line}"
            result[fmt] = resumed
            dist.barrier()
        report[scenario] = result

    report["seconds"] = round(time.perf_counter() - start, 1)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing's async save re-imports __main__
    main(sys.argv[1], sys.argv[2:])
