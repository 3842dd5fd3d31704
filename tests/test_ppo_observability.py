"""What a PPO run tells its user beyond the PPO losses: the EOS mass (exact against a full softmax, at TP1
and TP2), the FLOPs formula behind MFU (against a hand computation), the phase timer, and one tiny coarse-
actor job with wandb offline that is killed and requeued in a new run directory: every new metric is
logged, samples go to ``samples.jsonl`` and a wandb Table, and both halves log into one wandb run (the id
travels in the checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from c2f_megatron.models.config import ModelConfig
from c2f_megatron.platform.role_layout import RoleLayout
from c2f_megatron.rl import core_algos
from c2f_megatron.rl.experience import Experience
from c2f_megatron.rl.workers import response_logprobs
from c2f_megatron.training.perf import (
    PhaseTimer,
    flops_per_token,
    matmul_weights,
    memory_metrics,
    mfu,
    mfu_metrics,
    peak_flops,
    sequence_flops,
)
from tests.launch import WORKERS, run_torchrun, worker_env

TRUE_VOCAB = 60
SUPPRESSED = [2, 41]  # one id on each half of a 2-way split of 64 columns


# ------------------------------------------------------------------------------------------ EOS mass


def layout(tp: int = 1, rank: int = 0, group=None) -> RoleLayout:
    return RoleLayout("actor", tp, 1, 1, rank, 0, 0, group, None, None, [0])


def toy_batch(padded_vocab: int) -> tuple[torch.Tensor, Experience]:
    """Logits ``[3, P+R, padded_vocab]`` (P = 3, R = 5) and rows with right padding after short responses;
    the padding holds a suppressed id (pad == EOS)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, padded_vocab, generator=gen) * 3
    logits[..., SUPPRESSED[0]] += 4.0  # a policy that pushes for EOS: a mass far from 0
    tokens = torch.randint(3, TRUE_VOCAB, (3, 8), generator=gen)
    tokens[tokens == SUPPRESSED[1]] = 7
    response_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    tokens[:, 3:][~response_mask] = SUPPRESSED[0]
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    return logits, Experience(tokens, prompt_mask, response_mask, torch.ones(3, dtype=torch.bool))


def reference(logits: torch.Tensor, mb: Experience, temperature: float) -> torch.Tensor:
    """The slow way: the full softmax over the true vocabulary, nothing suppressed, summed over the
    suppressed ids; 0 on padding."""
    p, r = mb.prompt_width, mb.response_width
    probs = torch.softmax(logits[:, p - 1 : p + r - 1, :TRUE_VOCAB].double() / temperature, dim=-1)
    return torch.where(mb.response_mask, probs[..., SUPPRESSED].sum(-1), 0.0).float()


def test_eos_mass_is_the_full_softmax_on_the_suppressed_ids() -> None:
    logits, mb = toy_batch(padded_vocab=64)
    out = response_logprobs(
        mb.output_rows(logits), mb, layout(), TRUE_VOCAB, SUPPRESSED, 0.7, with_eos_mass=True
    )
    expected = reference(logits, mb, 0.7)
    assert torch.allclose(out["eos_mass"], expected, atol=1e-6, rtol=1e-5)
    assert float(expected[mb.response_mask].max()) > 0.3  # the toy policy does push against the cut
    # the log-probs (the training math) are the same whether the mass is asked for or not, bit for bit
    plain = response_logprobs(
        mb.output_rows(logits), mb, layout(), TRUE_VOCAB, SUPPRESSED, 0.7, with_entropy=True
    )
    both = response_logprobs(
        mb.output_rows(logits),
        mb,
        layout(),
        TRUE_VOCAB,
        SUPPRESSED,
        0.7,
        with_entropy=True,
        with_eos_mass=True,
    )
    assert torch.equal(plain["logprobs"], both["logprobs"]) and torch.equal(plain["entropy"], both["entropy"])
    # nothing suppressed (plain PPO): no EOS mass
    assert "eos_mass" not in response_logprobs(
        mb.output_rows(logits), mb, layout(), TRUE_VOCAB, [], 1.0, with_eos_mass=True
    )


def test_eos_mass_at_tp2_matches_the_unsharded_reference() -> None:
    run_torchrun("eos_mass_check.py", 2, [], timeout=120)


def test_bucket_means_are_the_means_of_each_slice_of_positions() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 10, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 10, generator=gen) > 0.3
    mask[:, 5] = False  # position 5 is invalid everywhere: bucket 2 of 3 still has positions 6..9
    means, counts = core_algos.masked_bucket_means(x, mask, 3)
    for k, (lo, hi) in enumerate([(0, 4), (4, 7), (7, 10)]):  # t * 3 // 10
        sel = mask[:, lo:hi]
        assert counts[k] == sel.sum()
        assert means[k] == pytest.approx(float(x[:, lo:hi][sel].mean()))
    means, counts = core_algos.masked_bucket_means(x[:, :4], mask[:, :4], 8)  # more buckets than positions
    assert counts.tolist() == [float(mask[:, k // 2].sum()) if k % 2 == 0 else 0.0 for k in range(8)]


# ------------------------------------------------------------------------------------------ FLOPs, MFU


def test_flops_against_a_hand_computation() -> None:
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        vocab_size=100,
    )
    # per layer: Q 64x64, K and V 64x32 each, output 64x64, SwiGLU 3 x 64x128 = 4096 + 4096 + 4096 + 24576
    assert matmul_weights(cfg) == 2 * 36864 + 100 * 64
    assert matmul_weights(cfg, lm_head=False) == 2 * 36864 + 64
    # training: 6 N + 12 L d s; forward: 2 N + 4 L d s (d = 4 heads x 16 = 64)
    assert flops_per_token(cfg, 10, training=True) == 6 * 80128 + 12 * 2 * 64 * 10
    assert flops_per_token(cfg, 10, training=False, lm_head=False) == 2 * 73792 + 4 * 2 * 64 * 10
    expected = 10 * (2 * 80128 + 4 * 2 * 64 * 10) + 5 * (2 * 80128 + 4 * 2 * 64 * 5)
    assert sequence_flops(cfg, [10, 5], training=False) == expected
    assert mfu(1e12, 2.0, 4, 1e12) == 0.125
    metrics = mfu_metrics({"rollout": 4e12, "actor_update": 0.0}, {"rollout": 2.0}, 8.0, 1e12)
    assert metrics == {"mfu": 0.5, "mfu_rollout": 2.0}  # one rank here; a phase without FLOPs has no MFU
    assert mfu_metrics({"rollout": 4e12}, {"rollout": 2.0}, 8.0, None) == {}


def test_peak_flops_by_device_name() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3") == peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Tesla T4") is None
    if not torch.cuda.is_available():
        assert peak_flops() is None  # the CPU: no MFU


def test_phase_timer_sums_repeats_and_memory_is_named_for_what_it_is() -> None:
    timer = PhaseTimer(cuda=False)
    for _ in range(3):
        with timer.phase("critic_update"):
            pass
    assert set(timer.seconds) == {"critic_update"} and timer.seconds["critic_update"] >= 0
    assert not timer.peak_gb  # no per-phase peak on the CPU
    memory = memory_metrics(timer)
    assert list(memory) == ["peak_rss_gb"] and 0.01 < memory["peak_rss_gb"] < 1000


def test_samples_are_taken_at_the_first_the_last_and_every_nth_iteration(tmp_path: Path) -> None:
    from c2f_megatron.rl.config import SampleLogConfig
    from c2f_megatron.rl.ppo_trainer import SampleLog

    every_third = SampleLog(tmp_path / "s.jsonl", str, SampleLogConfig(every=3, rows=2), log=None)
    assert [s for s in range(1, 11) if every_third.due(s, 10)] == [1, 3, 6, 9, 10]
    assert not SampleLog(tmp_path / "s.jsonl", str, SampleLogConfig(rows=0), log=None).due(1, 10)
    with pytest.raises(ValueError, match="samples.every"):
        SampleLogConfig(every=0)


# ------------------------------------------------------------------------------------------ end to end


def _coarse_actor(args: list[str], wandb_mode: str = "offline") -> str:
    env = worker_env(threads=2)
    env["WANDB_MODE"] = wandb_mode
    proc = subprocess.run(
        [sys.executable, str(WORKERS / "ppo_cli.py"), *args],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _offline_run_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}


def test_observability_and_one_wandb_run_across_a_requeue(tmp_path: Path) -> None:
    from tests.test_ppo_trainer import TINY, read_metrics, write_config

    first, second, ckpt = tmp_path / "first", tmp_path / "second", tmp_path / "ckpt"
    cfg = write_config(tmp_path / "ppo.yaml", first, TINY)
    common = [str(cfg), "ppo.iterations=2", f"checkpoint.dir={ckpt}", "samples.rows=2", "ppo.epochs=1"]
    _coarse_actor([*common, "checkpoint.exit_after_iterations=1"])
    run_id = (first / "wandb_run_id").read_text().strip()
    saved = json.loads((ckpt / "step_0000001" / "trainer_state.json").read_text())
    assert saved["extra"]["wandb_run_id"] == run_id
    # requeued into a fresh run directory: the id comes from the checkpoint
    out = _coarse_actor([*common, f"logging.run_dir={second}"])
    assert "resumed from" in out
    assert (second / "wandb_run_id").read_text().strip() == run_id
    assert _offline_run_ids(first) == _offline_run_ids(second) == {run_id}

    (record,) = read_metrics(second)
    metrics = {k.split("/", 1)[1] for k in record if "/" in k}
    expected = {
        *(f"time_{p}_s" for p in ("rollout", "actor_logprobs", "ref_logprobs", "values", "reward", "gae")),
        *("time_critic_update_s", "time_actor_update_s", "time_scoring_s", "time_save_s", "iteration_time_s"),
        *("gen_tokens_per_s_per_rank", "tokens_per_s_per_rank", "peak_rss_gb"),
        *(f"{x}_{s}" for x in ("advantages", "returns", "values") for s in ("mean", "std", "min", "max")),
        *("reward_raw_min", "reward_raw_max", "penalized_reward_mean", "response_length_min"),
        *("eos_mass_mean", "eos_mass_max", *(f"eos_mass_pos_{k}" for k in range(8))),
    }
    assert expected <= metrics, expected - metrics
    assert not any(k.startswith(("mfu", "peak_mem")) for k in metrics)  # CPU: no MFU, no allocator peak
    assert 0 < record["train/eos_mass_mean"] <= record["train/eos_mass_max"] < 1
    assert record["train/time_actor_update_s"] > 0 and record["train/time_critic_update_s"] > 0

    samples = [json.loads(line) for line in (second / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["row"]) for s in samples] == [(2, 0), (2, 1)]
    assert all(s["length"] == 12 and 0 < s["eos_mass"] < 1 and s["response"] for s in samples)
    tables = list((second / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 1, list((second / "wandb").rglob("*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["step", "row", "prompt", "response"] and len(table["data"]) == 2
