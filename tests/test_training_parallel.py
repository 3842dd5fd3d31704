"""TP=2 and PP=2 give the same losses as TP=1 for the same initial weights and data (LM and reward model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch import run_python, run_torchrun

TEXT = " ".join(f"sentence {i} says {w} {i % 5}." for i, w in enumerate(["alpha", "beta", "gamma"] * 80))


def losses(run_dir: Path, key: str = "train/loss") -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def launch(command: str, cfg: Path, tp: int, pp: int, overrides: list[str]) -> None:
    args = [
        command,
        str(cfg),
        f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}",
        *overrides,
    ]
    if tp * pp == 1:
        run_python("train_cli.py", args, timeout=300)
    else:
        run_torchrun("train_cli.py", tp * pp, args, timeout=300)


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-step LM checkpoint (TP=1): the shared initial weights."""
    tmp = tmp_path_factory.mktemp("init")
    (tmp / "corpus.txt").write_text(TEXT)
    cfg = tmp / "lm.yaml"
    cfg.write_text(
        "model: {preset: mistral-nano, overrides: {layer_spec: local}}\n"
        "optim: {lr: 1.0e-3}\n"
        "train: {train_steps: 1, micro_batch_size: 2, global_batch_size: 4, seq_length: 32}\n"
        f"data: {{paths: [{tmp / 'corpus.txt'}], eval_fraction: 0.0}}\n"
        f"checkpoint: {{dir: {tmp / 'ckpt'}}}\nlogging: {{run_dir: {tmp / 'run'}}}\n"
    )
    launch("train-lm", cfg, 1, 1, [])
    return tmp / "ckpt" / "step_0000001"


def write_job(tmp_path: Path, init_ckpt: Path, command: str, shared_data: Path, head: str = "") -> Path:
    """A 3-step job from ``init_ckpt``'s weights: the LM corpus, or 64 HH pairs for the reward model."""
    cfg = tmp_path / "job.yaml"
    common = (
        head + f"checkpoint: {{init_from: {init_ckpt}}}\n"
        "optim: {lr: 1.0e-3, clip_grad: 1.0}\n"
        "train: {train_steps: 3, micro_batch_size: 2, global_batch_size: 4, seq_length: 48}\n"
    )
    if command == "train-lm":
        data = f"data: {{paths: [{init_ckpt.parents[1] / 'corpus.txt'}], eval_fraction: 0.0}}\n"
    else:
        hh = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
        data = f"data: {{hh: {{source: {hh}, split: null, max_pairs: 64, eval_fraction: 0.0}}}}\n"
    cfg.write_text(common + data)
    return cfg


@pytest.mark.parametrize("command", ["train-lm", "train-rm"])
def test_tp2_and_pp2_match_tp1(init_ckpt: Path, tmp_path: Path, command: str, shared_data: Path) -> None:
    cfg = write_job(tmp_path, init_ckpt, command, shared_data)
    layouts = [(1, 1), (2, 1), (1, 2)]
    results = {}
    for tp, pp in layouts:
        run_dir = tmp_path / f"tp{tp}pp{pp}"
        launch(command, cfg, tp, pp, [f"logging.run_dir={run_dir}"])
        results[(tp, pp)] = losses(run_dir)
    reference = results[(1, 1)]
    assert len(reference) == 3
    for layout in layouts[1:]:
        assert results[layout] == pytest.approx(reference, abs=2e-5), (layout, results)


@pytest.mark.parametrize("command", ["train-lm", "train-rm"])
def test_sequence_parallel_and_recompute_leave_training_unchanged(
    init_ckpt: Path, tmp_path: Path, command: str, shared_data: Path
) -> None:
    """At TP=2, sequence parallelism (with the SDPA spec's own RMSNorm) and megatron's selective and full
    recompute give the plain run's losses and gradient norms, step by step."""
    cfg = write_job(tmp_path, init_ckpt, command, shared_data, "model: {overrides: {layer_spec: sdpa}}\n")
    variants = {
        "plain": [],
        "sp+selective": ["parallel.sequence_parallel=true", "parallel.recompute_granularity=selective"],
        "sp+full": [
            "parallel.sequence_parallel=true",
            "parallel.recompute_granularity=full",
            "parallel.recompute_num_layers=2",
        ],
        "full block": [
            "parallel.recompute_granularity=full",
            "parallel.recompute_method=block",
            "parallel.recompute_num_layers=1",
        ],
    }
    if command == "train-rm":  # recompute is the LM's case; the RM checks the scalar head under SP
        del variants["full block"], variants["sp+full"]
    results = {}
    for name, extra in variants.items():
        run_dir = tmp_path / name.replace(" ", "_").replace("+", "_")
        launch(command, cfg, 2, 1, [f"logging.run_dir={run_dir}", *extra])
        results[name] = (losses(run_dir), losses(run_dir, "train/grad_norm"))
    ref_loss, ref_norm = results["plain"]
    assert len(ref_loss) == 3 and len(ref_norm) == 3
    for name, (loss, norm) in results.items():
        assert loss == pytest.approx(ref_loss, abs=2e-5), (name, results)
        assert norm == pytest.approx(ref_norm, rel=1e-4), (name, results)
