"""Continuous Maximization and the ablation schedules on synthetic reward / critic-loss streams."""

from __future__ import annotations

import json
import math
import random

import pytest

from c2f_megatron.rl.length_control import (
    ContinuousMaximization,
    ContinuousMaximizationConfig,
    FixedLength,
    LengthControlConfig,
    StepEvery,
    build_length_controller,
    critic_oscillation,
    f_cm,
    reward_instability,
)


def stable_stream(n: int, seed: int = 0) -> list[tuple[float, float]]:
    """Slowly improving reward with a little noise; critic loss decaying smoothly with 1% noise."""
    rng = random.Random(seed)
    return [
        (0.5 + 0.02 * i + 0.02 * rng.gauss(0, 1), math.exp(-0.05 * i) * (1 + 0.01 * rng.gauss(0, 1)))
        for i in range(n)
    ]


def zigzag_critic_stream(n: int) -> list[tuple[float, float]]:
    return [(0.5 + 0.02 * i, 1.0 + (0.3 if i % 2 else -0.3)) for i in range(n)]


def collapsing_reward_stream(n: int) -> list[tuple[float, float]]:
    return [(1.0 - 0.2 * i, math.exp(-0.05 * i)) for i in range(n)]


def run(ctl, stream):
    return [ctl.update(r, c) for r, c in stream]


def test_signals_on_pure_shapes():
    rising = [0.1 * i for i in range(8)]
    assert reward_instability(rising, 1.0) == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    falling = [1.0 - 0.1 * i for i in range(8)]  # mean 0.65: the floor (1.0) normalises, then the mean does
    u_r, drop, fluct = reward_instability(falling, 1.0)
    assert drop == pytest.approx(0.7) and fluct == pytest.approx(0.0, abs=1e-12) and u_r == drop
    assert reward_instability(falling, 0.1)[1] == pytest.approx(0.7 / 0.65)
    o_c, flips, amp = critic_oscillation([1.0 + (0.2 if i % 2 else -0.2) for i in range(8)], 1e-3)
    assert flips == 1.0 and amp == pytest.approx(0.2, rel=0.05) and o_c == flips * amp
    o_c, flips, _ = critic_oscillation([math.exp(-0.3 * i) for i in range(8)], 1e-3)
    assert flips == 0.0 and o_c == 0.0
    assert f_cm(0.0, 0.0, 10.0, 10.0, 2.0) == pytest.approx(1 / (1 + math.exp(-2)))
    assert f_cm(100.0, 0.0, 10.0, 10.0, 2.0) == pytest.approx(0.0, abs=1e-12)  # no overflow
    assert math.isnan(f_cm(math.nan, 0.0, 10.0, 10.0, 2.0))


def test_raises_on_stable_stream_after_warmup_with_cooldown():
    cfg = ContinuousMaximizationConfig(initial_length=128, max_length=2048, step=64, window=8, cooldown=3)
    decisions = run(ContinuousMaximization(cfg), stable_stream(20))
    assert [d.reason for d in decisions[:7]] == ["warmup"] * 7
    assert all(math.isnan(d.f_cm) for d in decisions[:7]) and all(d.length == 128 for d in decisions[:7])
    # first raise as soon as the window is full, then one every cooldown + 1 iterations
    assert [d.reason for d in decisions[7:16]] == ["increase"] + ["cooldown"] * 3 + ["increase"] + [
        "cooldown"
    ] * 3 + ["increase"]
    assert [d.length for d in decisions[7:16]] == [192] * 4 + [256] * 4 + [320]
    assert all(d.f_cm > cfg.threshold for d in decisions[7:])
    assert [d.increased for d in decisions].count(True) == sum(d.reason == "increase" for d in decisions)


def test_holds_on_zigzag_critic_loss():
    decisions = run(ContinuousMaximization(ContinuousMaximizationConfig()), zigzag_critic_stream(30))
    assert all(d.length == 128 and not d.increased for d in decisions)
    assert all(d.reason == "unstable" for d in decisions[7:])
    assert decisions[-1].critic_flips == 1.0 and decisions[-1].f_cm < 0.5
    assert decisions[-1].reward_instability == pytest.approx(0.0, abs=1e-9)  # only the critic holds it


def test_holds_on_collapsing_reward():
    decisions = run(ContinuousMaximization(ContinuousMaximizationConfig()), collapsing_reward_stream(30))
    assert all(d.length == 128 for d in decisions)
    assert all(d.reason == "unstable" and d.reward_drop > 0 for d in decisions[7:])
    assert decisions[-1].critic_oscillation == 0.0  # only the reward holds it


def test_non_finite_input_holds_until_it_leaves_the_window():
    cfg = ContinuousMaximizationConfig(window=4, cooldown=0)
    stream = stable_stream(12)
    stream[5] = (math.nan, stream[5][1])
    decisions = run(ContinuousMaximization(cfg), stream)
    assert [d.reason for d in decisions[5:9]] == ["unstable"] * 4
    assert decisions[9].reason == "increase"


def test_respects_cap():
    cfg = ContinuousMaximizationConfig(initial_length=128, max_length=300, step=64, window=4, cooldown=0)
    decisions = run(ContinuousMaximization(cfg), stable_stream(12))
    assert [d.length for d in decisions] == [128] * 3 + [192, 256, 300] + [300] * 6
    assert [d.reason for d in decisions[6:]] == ["cap"] * 6


def test_stable_stream_resumes_identically_from_state_dict():
    cfg = ContinuousMaximizationConfig(window=6, cooldown=2)
    stream = stable_stream(12) + zigzag_critic_stream(8) + stable_stream(15, seed=1)
    full = ContinuousMaximization(cfg)
    expected = run(full, stream)
    for cut in (3, 7, 13, 22):  # in warm-up, in a cool-down, mid-stream, in an unstable stretch
        first = ContinuousMaximization(cfg)
        run(first, stream[:cut])
        state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON / torch.save round trip
        resumed = ContinuousMaximization(cfg)
        resumed.load_state_dict(state)
        assert resumed.metrics()["length_limit"] == first.metrics()["length_limit"]
        got = run(resumed, stream[cut:])
        assert [d.length for d in got] == [d.length for d in expected[cut:]]
        assert [d.reason for d in got] == [d.reason for d in expected[cut:]]
        assert [d.f_cm for d in got] == pytest.approx([d.f_cm for d in expected[cut:]], nan_ok=True)
    with pytest.raises(ValueError, match="state is for"):
        FixedLength(512).load_state_dict(full.state_dict())


def test_metrics_report_inputs_output_and_decision():
    ctl = ContinuousMaximization(ContinuousMaximizationConfig(window=3))
    run(ctl, stable_stream(3))
    m = ctl.metrics()
    assert m["length_limit"] == 192.0 and m["length_increased"] == 1.0 and m["length_reason"] == "increase"
    for key in (
        "cm_f",
        "cm_reward_instability",
        "cm_critic_oscillation",
        "cm_reward_drop",
        "cm_critic_flips",
    ):
        assert math.isfinite(m[key])
    assert all(isinstance(v, (float, str)) for v in m.values())


def test_fixed_length_ablation():
    ctl = build_length_controller(LengthControlConfig(kind="fixed", fixed_length=512))
    assert isinstance(ctl, FixedLength)
    decisions = run(ctl, stable_stream(20))
    assert all(d.length == 512 and not d.increased and d.reason == "fixed" for d in decisions)
    resumed = FixedLength(512)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.iteration == 20


def test_step_every_ablation_ignores_signals():
    cfg = LengthControlConfig(
        kind="step", every=3, cm=ContinuousMaximizationConfig(initial_length=100, step=50, max_length=220)
    )
    ctl = build_length_controller(cfg)
    assert isinstance(ctl, StepEvery)
    decisions = run(ctl, collapsing_reward_stream(5) + zigzag_critic_stream(7))  # unstable, raised anyway
    assert [d.length for d in decisions] == [100, 100, 150, 150, 150, 200, 200, 200, 220, 220, 220, 220]
    assert [d.increased for d in decisions].count(True) == 3
    assert decisions[-1].reason == "cap" and decisions[1].reason == "schedule"
    resumed = StepEvery(3, 50, 220, initial_length=100)
    first = StepEvery(3, 50, 220, initial_length=100)
    run(first, stable_stream(4))
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [d.length for d in run(resumed, stable_stream(8))] == [d.length for d in decisions[4:]]


def test_factory_and_config_validation():
    assert isinstance(build_length_controller(LengthControlConfig()), ContinuousMaximization)
    with pytest.raises(ValueError):
        build_length_controller(LengthControlConfig(kind="linear"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ContinuousMaximizationConfig(initial_length=4096, max_length=2048)
    with pytest.raises(ValueError):
        ContinuousMaximizationConfig(window=2)
    with pytest.raises(ValueError):
        ContinuousMaximizationConfig(threshold=1.0)
