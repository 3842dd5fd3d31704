"""``c2f coarse-actor examples/coarse_actor_cpu.yaml`` on HH-RLHF prompts with a small reward model trained in
the test: the run completes, the RM-normalised rewards are logged, and the CM length limit rises."""

from __future__ import annotations

import json
from pathlib import Path

from tests.launch import REPO_ROOT, run_python


def test_coarse_actor_cli_on_hh_rlhf(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    rm_cfg = tmp_path / "rm.yaml"
    rm_cfg.write_text(
        "model: {preset: mistral-nano, overrides: {layer_spec: sdpa}}\n"
        "optim: {lr: 1.0e-3, warmup_steps: 2}\n"
        "train: {train_steps: 6, micro_batch_size: 8, global_batch_size: 8, seq_length: 64, log_interval: 3}\n"
        f"data: {{hh: {{source: {source}, split: null, eval_fraction: 0.2, max_pairs: 200}}}}\n"
        f"checkpoint: {{dir: {tmp_path / 'rm'}}}\nlogging: {{run_dir: {tmp_path / 'rm_run'}, wandb_mode: disabled}}\n"
    )
    run_python("train_cli.py", ["train-rm", str(rm_cfg)], timeout=300)

    run_dir = tmp_path / "ppo"
    run_python(
        "ppo_cli.py",
        [
            str(REPO_ROOT / "examples" / "coarse_actor_cpu.yaml"),
            f"reward.path={tmp_path / 'rm'}",  # a checkpoint root: its latest step is used
            f"data.hh.source={source}",
            "data.hh.max_pairs=100",
            "data.max_prompt_length=24",
            "ppo.iterations=5",
            "ppo.rollout_batch_size=4",
            "ppo.mini_batch_size=4",
            "ppo.epochs=1",
            "length.cm.initial_length=4",
            "length.cm.step=4",
            "length.cm.window=3",
            "length.cm.cooldown=0",
            "length.cm.w_reward=0.01",
            "length.cm.w_critic=0.01",
            f"checkpoint.dir={tmp_path / 'ckpt'}",
            "checkpoint.save_interval=0",
            f"logging.run_dir={run_dir}",
            "logging.wandb_mode=disabled",
        ],
        timeout=400,
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    limits = [r["train/rollout_length_limit"] for r in rows]
    assert limits[0] == 4 and limits[-1] > limits[0], limits
    assert rows[-1]["train/length_limit"] > rows[0]["train/length_limit"]
    assert all(r["train/response_length_mean"] == r["train/rollout_length_limit"] for r in rows)
    assert rows[0]["train/actor_updated"] == 0.0 and rows[-1]["train/actor_updated"] == 1.0  # critic warm-up
    assert (tmp_path / "ckpt" / "step_0000005" / "actor" / "c2f_checkpoint.json").is_file()
