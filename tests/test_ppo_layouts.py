"""Every PPO role on its own TP/PP layout (and the actor at DP=2) reproduces the single-process run.

Baseline: one process, every role at TP=PP=1. Mixed layouts on 2 ranks:
- A: actor TP2, critic PP2, reference and reward model TP1 (DP2); killed after one iteration and resumed
  with the critic moved to TP2 (the checkpoint reshards);
- B: actor TP1 (DP2: each rank rolls out half the prompts), critic TP2, reference PP2, reward model TP2;
- C: actor TP2, critic DP2 on its own groups with the distributed optimizer; killed and resumed.
The reward is a frozen value model (the critic's initial checkpoint), so all four roles run real forwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch import run_python, run_torchrun
from tests.test_ppo_trainer import TINY, read_metrics, write_config

TWO_LAYERS = dict(TINY, num_layers=2)  # PP=2 needs a layer per stage
KEYS = (
    "reward_mean",
    "kl",
    "entropy",
    "pg_loss",
    "vf_loss",
    "approx_kl",
    "values_mean",
    "returns_mean",
    "actor_grad_norm",
    "critic_grad_norm",
)


def test_role_rank_lists_follow_megatrons_order() -> None:
    """TP fastest, then DP, then PP: the order ``parallel_state`` uses for the global layout."""
    from c2f_megatron.platform.role_layout import rank_lists

    lists = rank_lists(8, tp=2, pp=2)
    assert lists["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lists["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lists["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lists["mp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert lists["embd"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert rank_lists(2, tp=1, pp=1)["dp"] == [[0, 1]]


def test_vocab_parallel_logprobs_match_log_softmax_at_tp2() -> None:
    run_torchrun("vocab_parallel_check.py", 2, [], timeout=120)


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("init")
    run_python("ppo_init.py", [str(out), json.dumps(TWO_LAYERS)], timeout=300)
    return out


def _args(cfg: Path, init: Path, iterations: int, *extra: str) -> list[str]:
    return [
        str(cfg),
        f"ppo.iterations={iterations}",
        f"actor.init_from={init / 'actor'}",
        f"critic.init_from={init / 'critic'}",
        "reward.kind=model",
        f"reward.path={init / 'critic'}",
        "reward.normalize=false",
        *extra,
    ]


def _assert_same(base: list[dict], other: list[dict], label: str) -> None:
    assert [r["step"] for r in other] == [r["step"] for r in base], label
    for a, b in zip(base, other):
        for key in KEYS:
            assert a[f"train/{key}"] == pytest.approx(b[f"train/{key}"], rel=1e-4, abs=1e-6), (label, key)


@pytest.fixture(scope="module")
def baseline(init_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("base")
    run_python("ppo_cli.py", _args(write_config(tmp / "b.yaml", tmp / "run", TWO_LAYERS), init_ckpt, 3))
    rows = read_metrics(tmp / "run")
    assert rows[-1]["train/kl"] > 0  # the actor moved away from the reference
    return rows


def test_mixed_layouts_and_resume_on_another_critic_layout(
    tmp_path: Path, init_ckpt: Path, baseline: list[dict]
) -> None:
    run_dir, ckpt = tmp_path / "a", tmp_path / "ckpt_a"
    cfg = write_config(tmp_path / "a.yaml", run_dir, TWO_LAYERS)
    layout = [
        "parallel.tensor_model_parallel_size=2",
        "critic.parallel.tensor_model_parallel_size=1",
        "critic.parallel.pipeline_model_parallel_size=2",
        "reference.parallel.tensor_model_parallel_size=1",
        "reward.parallel.tensor_model_parallel_size=1",
        f"checkpoint.dir={ckpt}",
    ]
    out = run_torchrun(
        "ppo_cli.py", 2, _args(cfg, init_ckpt, 3, *layout, "checkpoint.exit_after_iterations=1")
    )
    assert "critic: TP 1 PP 2 DP 1; reference: TP 1 PP 1 DP 2" in out
    # resume with the critic on another layout: its model and optimizer state reshard on load
    resumed = [
        *layout,
        "critic.parallel.tensor_model_parallel_size=2",
        "critic.parallel.pipeline_model_parallel_size=1",
    ]
    out = run_torchrun("ppo_cli.py", 2, _args(cfg, init_ckpt, 3, *resumed))
    assert "resumed from" in out and "critic: TP 2 PP 1 DP 1" in out
    _assert_same(baseline, read_metrics(run_dir), "A")


def test_actor_data_parallel_with_other_roles_sharded(
    tmp_path: Path, init_ckpt: Path, baseline: list[dict]
) -> None:
    run_dir = tmp_path / "b"
    layout = [
        "critic.parallel.tensor_model_parallel_size=2",
        "reference.parallel.pipeline_model_parallel_size=2",
        "reward.parallel.tensor_model_parallel_size=2",
    ]
    cfg = write_config(tmp_path / "b.yaml", run_dir, TWO_LAYERS)
    out = run_torchrun("ppo_cli.py", 2, _args(cfg, init_ckpt, 3, *layout))
    assert "actor: TP 1 PP 1 DP 2; critic: TP 2 PP 1 DP 1; reference: TP 1 PP 2 DP 1" in out
    _assert_same(baseline, read_metrics(run_dir), "B")


def test_critic_distributed_optimizer_on_its_own_data_parallel_group(
    tmp_path: Path, init_ckpt: Path, baseline: list[dict]
) -> None:
    """Actor TP2 (the global layout, DP1); critic TP1 = DP2 on its own groups, with the distributed
    optimizer sharding its state over them; killed and resumed."""
    run_dir, ckpt = tmp_path / "c", tmp_path / "ckpt_c"
    cfg = write_config(tmp_path / "c.yaml", run_dir, TWO_LAYERS)
    layout = [
        "parallel.tensor_model_parallel_size=2",
        "critic.parallel.tensor_model_parallel_size=1",
        "critic.optim.use_distributed_optimizer=true",
        f"checkpoint.dir={ckpt}",
    ]
    out = run_torchrun(
        "ppo_cli.py", 2, _args(cfg, init_ckpt, 3, *layout, "checkpoint.exit_after_iterations=2")
    )
    assert "critic: TP 1 PP 1 DP 2" in out
    run_torchrun("ppo_cli.py", 2, _args(cfg, init_ckpt, 3, *layout))
    _assert_same(baseline, read_metrics(run_dir), "C")


def test_reference_on_another_layout_needs_the_actor_checkpoint(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", TINY)
    with pytest.raises(AssertionError, match="reference.parallel differs from the actor's layout"):
        run_torchrun(
            "ppo_cli.py",
            2,
            [
                str(cfg),
                "ppo.iterations=1",
                "parallel.tensor_model_parallel_size=2",
                "reference.parallel.tensor_model_parallel_size=1",
            ],
            timeout=200,
        )


def test_batch_must_split_over_each_roles_data_parallel_ranks(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "d.yaml", tmp_path / "run", TINY)
    # critic at TP1 on 2 ranks is DP2: 2 x micro-batch 16 does not divide a minibatch of 16
    with pytest.raises(AssertionError, match="ppo.mini_batch_size 16 must be a multiple of critic DP size 2"):
        run_torchrun(
            "ppo_cli.py",
            2,
            [
                str(cfg),
                "ppo.iterations=1",
                "ppo.mini_batch_size=16",
                "parallel.tensor_model_parallel_size=2",
                "critic.parallel.tensor_model_parallel_size=1",
            ],
            timeout=200,
        )


def test_a_layout_the_model_cannot_take_names_the_role(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "e.yaml", tmp_path / "run", dict(TINY, num_query_groups=1))
    with pytest.raises(
        AssertionError, match=r"critic.parallel \(critic: TP 2 PP 1 DP 1\): .*num_query_groups 1"
    ):
        run_torchrun(
            "ppo_cli.py",
            2,
            [str(cfg), "ppo.iterations=1", "critic.parallel.tensor_model_parallel_size=2"],
            timeout=200,
        )


def test_sequence_parallel_and_recompute_leave_ppo_unchanged(
    tmp_path: Path, init_ckpt: Path, baseline: list[dict]
) -> None:
    """Actor and critic at TP2 with sequence parallelism (rows padded to a multiple of TP, the rollout
    decoding without it) and selective recompute: the single-process run's metrics."""
    run_dir = tmp_path / "sp"
    layout = [
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "parallel.recompute_granularity=selective",
        "reference.parallel.tensor_model_parallel_size=1",
        "reward.parallel.tensor_model_parallel_size=1",
    ]
    cfg = write_config(tmp_path / "sp.yaml", run_dir, TWO_LAYERS)
    run_torchrun("ppo_cli.py", 2, _args(cfg, init_ckpt, 3, *layout))
    _assert_same(baseline, read_metrics(run_dir), "sequence parallel")


def test_padding_free_micro_batches_leave_ppo_unchanged(
    tmp_path: Path, init_ckpt: Path, baseline: list[dict]
) -> None:
    """The baseline packs its rows without padding (``ppo.pack_sequences``, the default); the same run on
    padded micro-batches has the same metrics over 3 iterations (log-probs and values differ by float
    rounding only: RoPE is relative, and each packed row attends to itself only)."""
    run_dir = tmp_path / "padded"
    cfg = write_config(tmp_path / "padded.yaml", run_dir, TWO_LAYERS)
    run_python("ppo_cli.py", _args(cfg, init_ckpt, 3, "ppo.pack_sequences=false"))
    _assert_same(baseline, read_metrics(run_dir), "padded micro-batches")
