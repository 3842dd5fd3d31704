"""Coarse Actor PPO end to end on a tiny model (CPU): a programmatic reward is learned, TP=2 matches TP=1,
kill-and-resume continues the uninterrupted run. Each run is ``c2f coarse-actor`` in a fresh process; the
assertions read its ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from c2f_megatron.rl.experience import Experience, finalize, normalize_scores
from c2f_megatron.rl.workers import TokenFrequencyReward
from tests.launch import run_python, run_torchrun

TINY = dict(
    num_layers=1,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=60,
    # padded to 64 at TP1 and TP2 (4 padded ids, masked): the sampler's draw depends on the padded width
    make_vocab_size_divisible_by=32,
    max_position_embeddings=64,
    layer_spec="sdpa",
)


def write_config(path: Path, run_dir: Path, model: dict, extra: str = "") -> Path:
    path.write_text(
        f"model: {{overrides: {json.dumps(model)}}}\n"
        "parallel: {seed: 1}\n"
        "actor: {optim: {lr: 5.0e-3, min_lr: 5.0e-3}}\n"
        "critic: {optim: {lr: 5.0e-3, min_lr: 5.0e-3}}\n"
        "reward: {kind: token_frequency, target_token: 5, clip: null}\n"
        "ppo: {iterations: 3, rollout_batch_size: 32, mini_batch_size: 32, micro_batch_size: 16, epochs: 4}\n"
        "kl: {coef: 0.01}\n"
        "length: {kind: fixed, fixed_length: 12}\n"
        "data: {source: synthetic, synthetic: {num_prompts: 128, min_len: 3, max_len: 6}}\n"
        f"logging: {{run_dir: {run_dir}, wandb_mode: disabled}}\n" + extra
    )
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ unit: experience


def _toy_experience() -> Experience:
    tokens = torch.tensor([[0, 9, 9, 5, 5, 7], [9, 9, 9, 5, 1, 1]])
    exp = Experience(
        tokens=tokens,
        prompt_mask=torch.tensor([[False, True, True], [True, True, True]]),
        response_mask=torch.tensor([[True, True, True], [True, True, True]]),
        hit_limit=torch.tensor([True, True]),
    )
    return exp


def test_token_frequency_reward_counts_only_response_tokens() -> None:
    exp = _toy_experience()
    exp.response_mask = torch.tensor([[True, True, True], [True, False, False]])
    assert TokenFrequencyReward(5).score(exp).tolist() == pytest.approx([2 / 3, 1.0])


def test_finalize_puts_score_on_last_token_and_whitens() -> None:
    exp = _toy_experience()
    exp.old_logprobs = torch.full((2, 3), -1.0)
    exp.ref_logprobs = torch.full((2, 3), -1.5)
    exp.values = torch.zeros(2, 3)
    exp.raw_scores = torch.tensor([1.0, -1.0])
    exp.scores = normalize_scores(exp.raw_scores, 0.0, 2.0, clip=0.25)
    assert exp.scores.tolist() == [0.25, -0.25]
    finalize(exp, kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=1.0, whiten=True)
    assert exp.kl.tolist() == [[0.5] * 3] * 2
    assert exp.token_rewards[:, -1].tolist() == pytest.approx([0.25 - 0.05, -0.25 - 0.05])
    assert exp.returns[:, 0].tolist() == pytest.approx([0.25 - 0.15, -0.25 - 0.15])
    assert exp.advantages.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert exp.advantages.std().item() == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------------------------ end to end


def test_programmatic_reward_rises(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "ppo.yaml", run_dir, TINY)
    run_python("ppo_cli.py", [str(cfg), "ppo.iterations=12"], timeout=400)
    rows = read_metrics(run_dir)
    rewards = [r["train/reward_mean"] for r in rows]
    assert len(rewards) == 12
    start, end = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    # the target token starts at ~1/64 of the response tokens; PPO must make it several times more frequent
    assert end > max(4 * start, 0.1), rewards
    assert all(r["train/hit_limit_frac"] == 1.0 for r in rows)  # coarse mode: never stops early
    assert all(r["train/response_length_mean"] == 12.0 for r in rows)
    # the trainer's forward reproduces the sampler's log-probs (same layout, mask, suppression)
    assert all(r["train/rollout_logprob_diff"] < 1e-4 for r in rows)


def test_plain_ppo_lets_eos_end_responses(tmp_path: Path) -> None:
    """``generation.suppress_eos: false`` (ordinary PPO, the paper's Plus baseline): a sampled EOS ends a
    response and is part of it; rewarded for EOS, the policy learns to stop earlier."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "ppo.yaml", run_dir, TINY)
    overrides = ["ppo.iterations=10", "generation.suppress_eos=false", "reward.target_token=2"]
    run_python("ppo_cli.py", [str(cfg), *overrides], timeout=400)
    rows = read_metrics(run_dir)
    lengths = [r["train/response_length_mean"] for r in rows]
    stopped = [1.0 - r["train/hit_limit_frac"] for r in rows]
    assert min(lengths) < 12.0 and max(stopped) > 0.0, (lengths, stopped)
    assert sum(lengths[-2:]) / 2 < sum(lengths[:2]) / 2 - 1.0, lengths  # learns to stop earlier
    assert sum(stopped[-2:]) > sum(stopped[:2]), stopped
    # the trainer's log-probs (nothing suppressed) reproduce the sampler's, EOS tokens included
    assert all(r["train/rollout_logprob_diff"] < 1e-4 for r in rows)


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("init")
    run_python("ppo_init.py", [str(out), json.dumps(TINY)], timeout=300)
    return out


def test_tp2_matches_tp1(tmp_path: Path, init_ckpt: Path) -> None:
    runs = {}
    for tp in (1, 2):
        run_dir = tmp_path / f"tp{tp}"
        cfg = write_config(tmp_path / f"tp{tp}.yaml", run_dir, TINY)
        args = [
            str(cfg),
            "ppo.iterations=2",
            f"parallel.tensor_model_parallel_size={tp}",
            f"actor.init_from={init_ckpt / 'actor'}",
            f"critic.init_from={init_ckpt / 'critic'}",
        ]
        if tp == 1:
            run_python("ppo_cli.py", args, timeout=400)
        else:
            run_torchrun("ppo_cli.py", 2, args, timeout=400)
        runs[tp] = read_metrics(run_dir)
    keys = [
        "reward_mean",
        "kl",
        "entropy",
        "pg_loss",
        "vf_loss",
        "approx_kl",
        "values_mean",
        "actor_grad_norm",
    ]
    for a, b in zip(runs[1], runs[2]):
        for key in keys:
            assert a[f"train/{key}"] == pytest.approx(b[f"train/{key}"], rel=1e-3, abs=1e-5), (key, a, b)


def test_kill_and_resume_matches_uninterrupted(tmp_path: Path) -> None:
    extra = "length: {kind: cm, cm: {initial_length: 8, max_length: 16, step: 2, window: 3, cooldown: 0, w_reward: 0.0, w_critic: 0.0}}\n"
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    cfg_full = write_config(tmp_path / "full.yaml", full_dir, TINY, extra)
    run_python(
        "ppo_cli.py",
        [str(cfg_full), "ppo.iterations=4", "kl.kind=adaptive", "kl.target=0.05", "kl.horizon=64"],
        timeout=400,
    )
    cfg_part = write_config(tmp_path / "part.yaml", part_dir, TINY, extra)
    common = [
        str(cfg_part),
        "ppo.iterations=4",
        "kl.kind=adaptive",
        "kl.target=0.05",
        "kl.horizon=64",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
    ]
    run_python("ppo_cli.py", [*common, "checkpoint.exit_after_iterations=2"], timeout=400)
    run_python("ppo_cli.py", common, timeout=400)
    full, part = read_metrics(full_dir), read_metrics(part_dir)
    assert [r["step"] for r in part] == [1, 2, 3, 4]
    for a, b in zip(full, part):
        for key in (
            "reward_mean",
            "kl",
            "kl_coef",
            "pg_loss",
            "vf_loss",
            "length_limit",
            "rollout_length_limit",
        ):
            assert a[f"train/{key}"] == pytest.approx(b[f"train/{key}"], rel=1e-5, abs=1e-7), (key, a, b)
    # the CM limit rose during the run and the resumed half continued from the restored controller
    assert full[-1]["train/rollout_length_limit"] > full[0]["train/rollout_length_limit"]
    assert full[2]["train/kl_coef"] != full[0]["train/kl_coef"]


def test_nonfinite_iterations_are_skipped_then_stop_the_run(tmp_path: Path) -> None:
    """The critic's loss NaN from iteration 2: iterations 2-4 skip their updates (logged, with the reason),
    and the run stops after ppo.max_consecutive_nonfinite=3 of them in a row, exit code 3."""
    import subprocess
    import sys

    from tests.launch import WORKERS, worker_env

    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "ppo.yaml", run_dir, TINY)
    args = [
        "ppo.iterations=6",
        "ppo.epochs=1",
        "ppo.micro_batch_size=32",
        f"checkpoint.dir={tmp_path / 'ck'}",
    ]
    proc = subprocess.run(
        [sys.executable, str(WORKERS / "ppo_nan.py"), "2", str(cfg), *args],
        capture_output=True,
        text=True,
        env=worker_env(2),
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert (
        "3 consecutive non-finite iterations (ppo.max_consecutive_nonfinite=3); stopping at iteration 4"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert "iteration 2: non-finite loss or grad norm; update skipped (1 in a row)" in proc.stdout
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if r.get("train/skipped_steps", 0) > 0] == [2, 3, 4]
    assert rows[0]["step"] == 1 and rows[0]["train/skipped_steps"] == 0
