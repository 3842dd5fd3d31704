"""NaN guard: a non-finite step changes nothing; ``run`` stops after ``max_consecutive_nan`` in a row."""

import json
import sys
from functools import partial

import torch

from c2f_megatron.engine import OptimConfig, RoleModel
from c2f_megatron.platform.distributed import device, init_distributed
from c2f_megatron.training.config import ModelSection, TrainConfig, TrainerSections
from c2f_megatron.training.run_loop import NonFiniteLossError
from c2f_megatron.training.tasks.lm import collate_windows, token_forward_step
from c2f_megatron.training.trainer import Task, run

VOCAB, SEQ = 128, 16


def poisoned_forward_step(poison: bool, data_iterator, model):
    output, loss_func = token_forward_step(VOCAB, data_iterator, model)
    if poison:
        output = output * float("nan")
    return output, loss_func


def snapshot(tm) -> list[torch.Tensor]:
    params = [p.detach().clone() for c in tm.chunks for p in c.parameters()]
    opt = tm.optimizer.state_dict()
    states = [v.clone() for s in opt["state"].values() for v in s.values() if torch.is_tensor(v)]
    return params + states


def main(run_dir: str) -> None:
    cfg = TrainerSections(
        model=ModelSection(
            overrides=dict(
                num_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                num_query_groups=2,
                ffn_hidden_size=64,
                vocab_size=VOCAB,
                layer_spec="local",
            )
        ),
        optim=OptimConfig(lr=1e-3, warmup_steps=0, decay_style="constant"),
        train=TrainConfig(
            train_steps=10, micro_batch_size=2, global_batch_size=2, seq_length=SEQ, max_consecutive_nan=3
        ),
    )
    cfg.logging.run_dir = run_dir
    init_distributed(cfg.parallel)
    model_cfg = cfg.model.resolve()
    tm = RoleModel.build("drill", "gpt", model_cfg, optim=cfg.optim, train_steps=10)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(3, VOCAB, (8, SEQ + 1), generator=g).tolist()
    batch = [collate_windows(windows[:2], device())]
    report = {}
    clean = tm.train_step(partial(poisoned_forward_step, False), batch, SEQ, 2)
    before, sched = snapshot(tm), tm.scheduler.num_steps
    bad = tm.train_step(partial(poisoned_forward_step, True), batch, SEQ, 2)
    after = snapshot(tm)
    report["clean_skipped"] = clean.skipped
    report["bad_skipped"] = bad.skipped
    report["bad_loss_finite"] = bool(torch.isfinite(torch.tensor(bad.metrics["loss"])))
    report["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after)) and len(before) == len(after)
    report["scheduler_unchanged"] = tm.scheduler.num_steps == sched
    again = tm.train_step(partial(poisoned_forward_step, False), batch, SEQ, 2)
    report["recovered"] = not again.skipped and again.metrics["loss"] < clean.metrics["loss"]

    calls = {"n": 0}

    def late_nan(data_iterator, model):  # steps 1-4 clean, NaN from step 5 on
        calls["n"] += 1
        return poisoned_forward_step(calls["n"] >= 5, data_iterator, model)

    task = Task("nan-drill", "gpt", windows, [], partial(collate_windows, device=device()), late_nan)
    try:
        run(cfg, task)
        report["stopped_at"] = None
    except NonFiniteLossError as exc:
        report["stopped_at"] = calls["n"]
        report["message"] = str(exc)
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
