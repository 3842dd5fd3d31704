"""Kill-and-resume gives the same per-step losses as an uninterrupted run (TP=1 and TP=2), and a step
directory interrupted mid-save is never picked as the latest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch import run_python, run_torchrun

TEXT = "\n".join(
    f"Document {i}: the {w} fox jumps over {i % 7} lazy dogs while the {w} cat counts to {i * 3}."
    for i, w in enumerate(["quick", "slow", "red", "blue", "green", "tiny"] * 40)
)


def lm_config(tmp: Path, name: str, **extra: str) -> tuple[Path, list[str]]:
    data = tmp / "corpus.txt"
    data.write_text(TEXT)
    cfg = tmp / "lm.yaml"
    cfg.write_text(
        "model: {preset: mistral-nano, overrides: {layer_spec: local, hidden_dropout: 0.1}}\n"
        "optim: {lr: 3.0e-3, warmup_steps: 2, decay_style: cosine}\n"
        "train: {train_steps: 6, micro_batch_size: 2, global_batch_size: 4, seq_length: 32, keep_last: 5}\n"
        f"data: {{paths: [{data}], eval_fraction: 0.05}}\n"
    )
    overrides = [f"checkpoint.dir={tmp / name / 'ckpt'}", f"logging.run_dir={tmp / name / 'run'}"]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return cfg, overrides


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in lines if "train/loss" in r}


def launch(tp: int, cfg: Path, overrides: list[str]) -> str:
    args = ["train-lm", str(cfg), f"parallel.tensor_model_parallel_size={tp}", *overrides]
    if tp == 1:
        return run_python("train_cli.py", args, timeout=300)
    return run_torchrun("train_cli.py", tp, args, timeout=300)


@pytest.mark.parametrize("tp", [1, 2])
def test_resume_matches_uninterrupted(tmp_path: Path, tp: int) -> None:
    cfg, full = lm_config(tmp_path, "full")
    launch(tp, cfg, full)
    _, part = lm_config(tmp_path, "part")
    out = launch(tp, cfg, [*part, "train.exit_after_steps=3"])
    assert "stopping at step 3" in out
    # a crash mid-save of step 4: the .partial directory must be ignored by the resume
    (tmp_path / "part" / "ckpt" / "step_0000004.partial" / "model").mkdir(parents=True)
    out = launch(tp, cfg, part)
    assert "resumed from" in out and "step_0000003" in out
    reference, resumed = train_losses(tmp_path / "full" / "run"), train_losses(tmp_path / "part" / "run")
    assert sorted(reference) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
    assert reference[6] < reference[1]  # it trained
    assert not (tmp_path / "part" / "ckpt" / "step_0000004.partial").exists()  # stale partial pruned


def test_bf16_resume_matches_uninterrupted(tmp_path: Path) -> None:
    """bf16 parameters (fp32 main copies in megatron's mixed-precision optimizer): every parameter, the
    norms included, is bf16, so the optimizer's sharded state covers them all and a resumed run continues
    the uninterrupted one (a norm left in fp32 once made the first save fail)."""
    bf16 = {"model__overrides__params_dtype": "bf16"}
    cfg, full = lm_config(tmp_path, "full", **bf16)
    launch(1, cfg, full)
    _, part = lm_config(tmp_path, "part", **bf16)
    launch(1, cfg, [*part, "train.exit_after_steps=3"])
    assert "resumed from" in launch(1, cfg, part)
    reference, resumed = train_losses(tmp_path / "full" / "run"), train_losses(tmp_path / "part" / "run")
    assert sorted(reference) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
