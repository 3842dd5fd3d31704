"""PPO math and KL control against slow loop references and hand-built cases (no model, no distributed)."""

from __future__ import annotations

import math

import pytest
import torch

from c2f_megatron.rl import core_algos as ca
from c2f_megatron.rl.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    KLControlConfig,
    build_kl_controller,
)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    # torch.testing.assert_close costs seconds of lazy imports on first use
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), (actual - expected).abs().max()


def ragged_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(width)] for n in lengths])


LENGTHS = [7, 3, 1, 7, 5]  # 7 = cut at the length limit (no padding), 1 = a lone EOS
WIDTH = 7


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ------------------------------------------------------------------------------------------ masked stats


def test_masked_mean_var_match_valid_values(gen):
    x = torch.randn(len(LENGTHS), WIDTH, generator=gen)
    mask = ragged_mask(LENGTHS, WIDTH)
    x = torch.where(mask.bool(), x, torch.tensor(float("nan")))  # padding must never leak in
    valid = [x[i, t].item() for i, n in enumerate(LENGTHS) for t in range(n)]
    mean = sum(valid) / len(valid)
    var = sum((v - mean) ** 2 for v in valid) / (len(valid) - 1)
    assert ca.masked_mean(x, mask).item() == pytest.approx(mean, rel=1e-5)
    assert ca.masked_var(x, mask).item() == pytest.approx(var, rel=1e-5)
    assert ca.masked_var(x, mask, unbiased=False).item() == pytest.approx(
        var * (len(valid) - 1) / len(valid), rel=1e-5
    )
    row_means = ca.masked_mean(x, mask, dim=-1)
    for i, n in enumerate(LENGTHS):
        assert row_means[i].item() == pytest.approx(sum(x[i, :n].tolist()) / n, rel=1e-5)
    assert ca.masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_whiten_unit_stats_and_zero_padding(gen):
    x = 3.0 + 5.0 * torch.randn(len(LENGTHS), WIDTH, generator=gen)
    mask = ragged_mask(LENGTHS, WIDTH)
    w = ca.masked_whiten(x, mask)
    assert ca.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert ca.masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-4)
    assert torch.all(w[~mask.bool()] == 0)
    kept = ca.masked_whiten(x, mask, shift_mean=False)
    assert ca.masked_mean(kept, mask).item() == pytest.approx(ca.masked_mean(x, mask).item(), rel=1e-5)
    assert ca.masked_var(kept, mask).item() == pytest.approx(1.0, rel=1e-4)


def test_agg_loss_modes(gen):
    loss = torch.rand(len(LENGTHS), WIDTH, generator=gen)
    lengths = [4, 0, 2]
    mask = ragged_mask(lengths, WIDTH)
    loss = loss[:3]
    tokens = [loss[i, t].item() for i, n in enumerate(lengths) for t in range(n)]
    per_seq = [sum(loss[i, :n].tolist()) / n for i, n in enumerate(lengths) if n]
    assert ca.agg_loss(loss, mask, "token-mean").item() == pytest.approx(sum(tokens) / len(tokens), rel=1e-6)
    assert ca.agg_loss(loss, mask, "token-sum").item() == pytest.approx(sum(tokens), rel=1e-6)
    assert ca.agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(sum(per_seq) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        ca.agg_loss(loss, mask, "sum")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ KL


def test_kl_estimators_formulas_and_k3_nonnegative(gen):
    logp = -5 * torch.rand(4, 9, generator=gen)
    ref = -5 * torch.rand(4, 9, generator=gen)
    k1, k2, k3 = (ca.kl_penalty(logp, ref, k) for k in ("k1", "k2", "k3"))
    for i in range(4):
        for t in range(9):
            d = logp[i, t].item() - ref[i, t].item()
            assert k1[i, t].item() == pytest.approx(d, abs=1e-5)
            assert k2[i, t].item() == pytest.approx(0.5 * d * d, abs=1e-5)
            assert k3[i, t].item() == pytest.approx(math.exp(-d) + d - 1, rel=1e-4, abs=1e-5)
    assert torch.all(k3 >= 0)
    assert torch.all(ca.kl_penalty(logp, logp, "k3") == 0)
    with pytest.raises(ValueError):
        ca.kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_k1_k3_expectations_equal_true_kl_on_sampled_categoricals(gen):
    n = 100_000
    for spread in (1.0, 0.3, 0.1):  # far apart .. close (the regime PPO keeps the actor in)
        logits = torch.randn(12, generator=gen)
        p = torch.softmax(logits, 0)  # actor
        q = torch.softmax(logits + spread * torch.randn(12, generator=gen), 0)  # reference
        true_kl = (p * (p.log() - q.log())).sum().item()
        tokens = torch.multinomial(p, n, replacement=True, generator=gen)
        logp, ref = p.log()[tokens], q.log()[tokens]
        k1, k3 = ca.kl_penalty(logp, ref, "k1"), ca.kl_penalty(logp, ref, "k3")
        assert k1.mean().item() == pytest.approx(true_kl, abs=5 * k1.std().item() / math.sqrt(n))
        assert k3.mean().item() == pytest.approx(true_kl, abs=5 * k3.std().item() / math.sqrt(n))
        if spread <= 0.3:
            assert k3.std() < k1.std()  # why k3 is the default: low variance when the policies are close


# ------------------------------------------------------------------------------------- rewards and GAE


def test_token_rewards_put_score_on_last_valid_token(gen):
    mask = ragged_mask(LENGTHS, WIDTH)
    kl = torch.randn(len(LENGTHS), WIDTH, generator=gen)
    score = torch.randn(len(LENGTHS), generator=gen)
    rewards = ca.compute_token_rewards(score, kl, 0.1, mask)
    for i, n in enumerate(LENGTHS):
        for t in range(WIDTH):
            expected = 0.0 if t >= n else -0.1 * kl[i, t].item() + (score[i].item() if t == n - 1 else 0.0)
            assert rewards[i, t].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="no valid token"):
        ca.compute_token_rewards(score[:2], kl[:2], 0.1, ragged_mask([3, 0], WIDTH))


def gae_reference(rewards, values, lengths, gamma, lam):
    adv = [[0.0] * WIDTH for _ in lengths]
    ret = [[0.0] * WIDTH for _ in lengths]
    for i, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[i][t + 1] if t + 1 < n else 0.0  # terminal at the last valid token, cut or not
            delta = rewards[i][t] + gamma * next_v - values[i][t]
            running = delta + gamma * lam * running
            adv[i][t] = running
            ret[i][t] = running + values[i][t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(0.95, 0.95), (1.0, 1.0), (0.9, 0.0), (0.99, 0.7)])
def test_gae_matches_loop_reference_on_ragged_and_cut_rows(gen, gamma, lam):
    mask = ragged_mask(LENGTHS, WIDTH)
    rewards = torch.randn(len(LENGTHS), WIDTH, generator=gen)
    values = torch.randn(len(LENGTHS), WIDTH, generator=gen)
    garbage = torch.where(mask.bool(), values, torch.full_like(values, 1e6))  # critic output on padding
    adv, ret = ca.compute_gae(rewards, garbage, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), LENGTHS, gamma, lam)
    assert_close(adv, torch.tensor(ref_adv))
    assert_close(ret, torch.tensor(ref_ret))


def test_gae_undiscounted_with_zero_critic_is_reward_to_go():
    mask = ragged_mask([3, 2], 4)
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 9.0, 9.0]])
    adv, ret = ca.compute_gae(rewards, torch.zeros(2, 4), mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [[6.0, 5.0, 3.0, 0.0], [9.0, 5.0, 0.0, 0.0]]
    assert torch.equal(adv, ret)


# ------------------------------------------------------------------------------------------------ losses


def test_policy_loss_clipping_hand_cases():
    # ratios 1.5, 0.5, 1.5, 0.5 against advantages +1, +1, -1, -1, eps 0.2
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, stats = ca.policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # per token: clipped -1.2 (active), unclipped -0.5, unclipped 1.5, clipped 0.8 (active)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4, rel=1e-6)
    assert stats["pg_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    grad = logp.grad[0].tolist()
    assert grad[0] == 0.0 and grad[3] == 0.0  # clipped tokens get no gradient
    assert grad[1] == pytest.approx(-0.5 / 4) and grad[2] == pytest.approx(1.5 / 4)  # d(-A r)/dlogp = -A r
    assert stats["ratio_mean"].item() == pytest.approx(1.0, rel=1e-6)
    assert stats["ratio_max"].item() == pytest.approx(1.5, rel=1e-6)
    d = math.log(1.5)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (d * d + math.log(0.5) ** 2) / 2, rel=1e-5)
    k3 = (1.5 - d - 1) + (0.5 - math.log(0.5) - 1)
    assert stats["approx_kl_k3"].item() == pytest.approx(k3 / 2, rel=1e-5)
    assert all(not v.requires_grad for v in stats.values())


def test_policy_loss_no_clip_inside_trust_region_and_matches_reference(gen):
    mask = ragged_mask(LENGTHS, WIDTH)
    old = -torch.rand(len(LENGTHS), WIDTH, generator=gen)
    logp = old + 0.5 * torch.randn(len(LENGTHS), WIDTH, generator=gen)
    adv = torch.randn(len(LENGTHS), WIDTH, generator=gen)
    per_tok = []
    for i, n in enumerate(LENGTHS):
        row = []
        for t in range(n):
            r = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            row.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
        per_tok.append(row)
    flat = [v for row in per_tok for v in row]
    loss, _ = ca.policy_loss(logp, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(sum(flat) / len(flat), rel=1e-5)
    loss_seq, _ = ca.policy_loss(logp, old, adv, mask, 0.2, agg="seq-mean-token-mean")
    assert loss_seq.item() == pytest.approx(sum(sum(r) / len(r) for r in per_tok) / len(per_tok), rel=1e-5)
    # on-policy (first minibatch of an epoch): nothing clipped, ratio 1, loss = -mean(A)
    loss0, stats0 = ca.policy_loss(old, old, adv, mask)
    assert stats0["pg_clipfrac"].item() == 0.0 and stats0["approx_kl"].item() == 0.0
    assert loss0.item() == pytest.approx(-ca.masked_mean(adv, mask).item(), rel=1e-5)


def test_value_loss_clipping_hand_cases():
    mask = torch.ones(1, 3)
    old = torch.zeros(1, 3)
    values = torch.tensor([[1.0, 1.0, 0.1]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0, 0.5]])
    loss, stats = ca.value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: unclipped 1, clipped (0.2-2)^2 = 3.24 -> clipped branch; token 1: 1 vs 0.04 -> unclipped;
    # token 2: inside the clip range -> both 0.16
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0 + 0.16) / 3, rel=1e-5)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert values.grad[0, 0].item() == 0.0 and values.grad[0, 1].item() != 0.0
    unclipped, _ = ca.value_loss(values, old, returns, mask, clip_range=None)
    assert unclipped.item() == pytest.approx(0.5 * (1.0 + 1.0 + 0.16) / 3, rel=1e-5)


def test_value_loss_explained_variance(gen):
    mask = ragged_mask(LENGTHS, WIDTH)
    returns = torch.randn(len(LENGTHS), WIDTH, generator=gen)
    _, perfect = ca.value_loss(returns, returns, returns, mask)
    assert perfect["explained_var"].item() == pytest.approx(1.0)
    constant = torch.full_like(returns, 0.3)
    _, useless = ca.value_loss(constant, constant, returns, mask, clip_range=None)
    assert useless["explained_var"].item() == pytest.approx(0.0, abs=1e-5)
    assert useless["vpred_mean"].item() == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------- KL control


def test_fixed_kl_controller_is_constant():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_direction_and_hand_computation():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=7.2, n_steps=256)  # error 0.2 (at the clip)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl.update(current_kl=60.0, n_steps=256)  # error 9 clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) ** 2)
    before = ctl.value
    ctl.update(current_kl=4.5, n_steps=1000)  # error -0.25 clipped to -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 0.1))
    before = ctl.value
    ctl.update(current_kl=6.6, n_steps=1000)  # error 0.1, not clipped
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 0.1))
    resumed = build_kl_controller(KLControlConfig(kind="adaptive", coef=0.1, target=6.0, horizon=10000))
    resumed.load_state_dict(ctl.state_dict())
    for c in (ctl, resumed):
        c.update(3.0, 500)
    assert resumed.value == ctl.value
    with pytest.raises(ValueError, match="state is for"):
        FixedKLController(0.1).load_state_dict(ctl.state_dict())
