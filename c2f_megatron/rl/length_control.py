"""Continuous Maximization (CM): raise the Coarse Actor's rollout length limit step by step while training
is stable (Mistral-C2F, arXiv 2406.08657), plus the two ablation schedules it is compared with.

Every PPO iteration the trainer calls ``update(reward_mean, critic_loss)`` and rolls out the next batch with
``decision.length``. CM keeps the last ``window`` values of both and computes two signals (0 = perfectly
stable), each on the window after removing its least-squares line, so a steady trend is not mistaken for
noise:

* reward instability ``u_r = (drop + fluct) / max(|mean(reward)|, reward_scale)``, where ``drop`` is the
  fall of the fitted line across the window (0 when the reward rises or is flat) and ``fluct`` the std of the
  residuals. A rising reward with little scatter gives ~0; a collapsing reward gives a large ``drop``.
* critic oscillation ``o_c = flips * std(residuals) / max(mean(critic_loss), critic_scale)``, where
  ``flips`` is the fraction of successive critic-loss differences that change sign. A smoothly falling loss
  has no flips (0); a zig-zag flips every step with a large amplitude (high); small noise flips often but
  with a small amplitude (low).

``f_CM = sigmoid(bias - w_reward * u_r - w_critic * o_c)`` (higher = more stable) and the limit grows by
``step`` (up to ``max_length``) when ``f_CM > threshold``. After a raise, ``cooldown`` iterations are held so
the window sees the new length's statistics before the next decision. A non-finite reward or critic loss
makes ``f_CM`` NaN, which holds the limit ("unstable") until it leaves the window.

Defaults: with ``bias = 2`` a perfectly stable window scores ``sigmoid(2) = 0.88`` and the limit holds once
``w_reward * u_r + w_critic * o_c >= 2``; with both weights 10 that is ~20% relative reward scatter or fall
over the window, or a critic loss zig-zagging by ~20% of its mean. ``reward_scale = 1`` keeps the relative
measure meaningful for reward-model scores near 0 (HH-RLHF reward models score within a few units of 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

HOLD_REASONS = ("warmup", "cooldown", "unstable", "cap")


@dataclass
class ContinuousMaximizationConfig:
    """CM's knobs; lengths in tokens, ``window``/``cooldown`` in PPO iterations."""

    initial_length: int = 128
    max_length: int = 2048  # the cap
    step: int = 64  # increase per raise
    window: int = 8  # iterations of history f_CM looks at (>= 3: flips need two differences)
    cooldown: int = 3  # iterations held after a raise
    w_reward: float = 10.0
    w_critic: float = 10.0
    bias: float = 2.0
    threshold: float = 0.5
    reward_scale: float = 1.0  # floor of the reward normaliser, in reward units
    critic_scale: float = 1e-3  # floor of the critic-loss normaliser

    def __post_init__(self) -> None:
        if not 0 < self.initial_length <= self.max_length:
            raise ValueError(
                f"need 0 < initial_length <= max_length, got {self.initial_length}, {self.max_length}"
            )
        if self.step <= 0 or self.window < 3 or self.cooldown < 0:
            raise ValueError(
                f"need step > 0, window >= 3, cooldown >= 0, got {self.step}, {self.window}, {self.cooldown}"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(
                f"threshold is compared with a sigmoid, need 0 < threshold < 1, got {self.threshold}"
            )
        if self.reward_scale <= 0 or self.critic_scale <= 0:
            raise ValueError("reward_scale and critic_scale must be > 0")


@dataclass
class LengthControlConfig:
    """Which schedule sets the rollout length limit: ``cm`` (the paper), or an ablation.

    ``fixed`` rolls out at ``fixed_length`` throughout; ``step`` raises ``cm.initial_length`` by ``cm.step``
    every ``every`` iterations up to ``cm.max_length`` regardless of stability.
    """

    kind: Literal["cm", "fixed", "step"] = "cm"
    cm: ContinuousMaximizationConfig = field(default_factory=ContinuousMaximizationConfig)
    fixed_length: int = 2048
    every: int = 10


@dataclass
class LengthDecision:
    """One iteration's outcome. ``reason`` is ``increase`` when raised, else why it held (``HOLD_REASONS`` for
    CM, ``fixed`` / ``schedule`` / ``cap`` for the ablations). The signals are NaN when not computed."""

    length: int
    increased: bool
    reason: str
    reward_instability: float = math.nan
    critic_oscillation: float = math.nan
    f_cm: float = math.nan
    reward_drop: float = math.nan
    reward_fluct: float = math.nan
    critic_flips: float = math.nan
    critic_amplitude: float = math.nan

    def metrics(self) -> dict[str, Any]:
        return {
            "length_limit": float(self.length),
            "length_increased": float(self.increased),
            "length_reason": self.reason,
            "cm_f": self.f_cm,
            "cm_reward_instability": self.reward_instability,
            "cm_critic_oscillation": self.critic_oscillation,
            "cm_reward_drop": self.reward_drop,
            "cm_reward_fluct": self.reward_fluct,
            "cm_critic_flips": self.critic_flips,
            "cm_critic_amplitude": self.critic_amplitude,
        }


class LengthController(Protocol):
    length: int

    def update(self, reward_mean: float, critic_loss: float) -> LengthDecision: ...

    def metrics(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ------------------------------------------------------------------------------------------- pure signals


def linear_fit(ys: list[float]) -> tuple[float, list[float]]:
    """Least-squares slope per iteration of ``ys`` against 0..n-1, and the residuals around that line."""
    n = len(ys)
    x_mean = (n - 1) / 2
    y_mean = sum(ys) / n
    sxx = sum((i - x_mean) ** 2 for i in range(n))
    slope = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(ys)) / sxx
    residuals = [y - (y_mean + slope * (i - x_mean)) for i, y in enumerate(ys)]
    return slope, residuals


def _std(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))


def reward_instability(rewards: list[float], scale: float) -> tuple[float, float, float]:
    """``(u_r, drop, fluct)``: relative fall of the fitted line across the window plus residual scatter."""
    slope, residuals = linear_fit(rewards)
    norm = max(abs(sum(rewards) / len(rewards)), scale)
    drop = max(0.0, -slope * (len(rewards) - 1)) / norm
    fluct = _std(residuals) / norm
    return drop + fluct, drop, fluct


def critic_oscillation(losses: list[float], scale: float) -> tuple[float, float, float]:
    """``(o_c, flips, amplitude)``: fraction of sign changes of successive differences times relative
    residual std (a zig-zag must both change direction and be large to count)."""
    diffs = [b - a for a, b in zip(losses[:-1], losses[1:])]
    flips = sum(1 for d0, d1 in zip(diffs[:-1], diffs[1:]) if d0 * d1 < 0) / (len(diffs) - 1)
    if any(not math.isfinite(x) for x in losses):
        flips = math.nan
    _, residuals = linear_fit(losses)
    amplitude = _std(residuals) / max(abs(sum(losses) / len(losses)), scale)
    return flips * amplitude, flips, amplitude


def f_cm(u_r: float, o_c: float, w_reward: float, w_critic: float, bias: float) -> float:
    """The logistic stability score in (0, 1); NaN inputs give NaN (never above a threshold)."""
    z = bias - w_reward * u_r - w_critic * o_c
    if math.isnan(z):
        return math.nan
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


# ------------------------------------------------------------------------------------------- controllers


class ContinuousMaximization:
    """The paper's CM controller (see the module docstring for the math)."""

    kind = "cm"

    def __init__(self, cfg: ContinuousMaximizationConfig) -> None:
        self.cfg = cfg
        self.length = cfg.initial_length
        self.rewards: list[float] = []
        self.critic_losses: list[float] = []
        self.cooldown_left = 0
        self.iteration = 0
        self.last = LengthDecision(self.length, False, "warmup")

    def update(self, reward_mean: float, critic_loss: float) -> LengthDecision:
        cfg = self.cfg
        self.iteration += 1
        self.rewards = (self.rewards + [float(reward_mean)])[-cfg.window :]
        self.critic_losses = (self.critic_losses + [float(critic_loss)])[-cfg.window :]
        signals: dict[str, float] = {}
        if len(self.rewards) == cfg.window:
            u_r, drop, fluct = reward_instability(self.rewards, cfg.reward_scale)
            o_c, flips, amplitude = critic_oscillation(self.critic_losses, cfg.critic_scale)
            signals = {
                "reward_instability": u_r,
                "critic_oscillation": o_c,
                "f_cm": f_cm(u_r, o_c, cfg.w_reward, cfg.w_critic, cfg.bias),
                "reward_drop": drop,
                "reward_fluct": fluct,
                "critic_flips": flips,
                "critic_amplitude": amplitude,
            }
        increased = False
        if self.length >= cfg.max_length:
            reason = "cap"
        elif not signals:
            reason = "warmup"
        elif self.cooldown_left > 0:
            self.cooldown_left -= 1
            reason = "cooldown"
        elif signals["f_cm"] > cfg.threshold:
            self.length = min(self.length + cfg.step, cfg.max_length)
            self.cooldown_left = cfg.cooldown
            increased, reason = True, "increase"
        else:
            reason = "unstable"
        self.last = LengthDecision(self.length, increased, reason, **signals)
        return self.last

    def metrics(self) -> dict[str, Any]:
        return self.last.metrics()

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "length": self.length,
            "rewards": list(self.rewards),
            "critic_losses": list(self.critic_losses),
            "cooldown_left": self.cooldown_left,
            "iteration": self.iteration,
            "last": asdict(self.last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.length = int(state["length"])
        self.rewards = [float(x) for x in state["rewards"]][-self.cfg.window :]
        self.critic_losses = [float(x) for x in state["critic_losses"]][-self.cfg.window :]
        self.cooldown_left = int(state["cooldown_left"])
        self.iteration = int(state["iteration"])
        self.last = LengthDecision(**state["last"])


class FixedLength:
    """Ablation: one length limit throughout."""

    kind = "fixed"

    def __init__(self, length: int) -> None:
        if length <= 0:
            raise ValueError(f"length must be > 0, got {length}")
        self.length = length
        self.iteration = 0
        self.last = LengthDecision(length, False, "fixed")

    def update(self, reward_mean: float, critic_loss: float) -> LengthDecision:
        del reward_mean, critic_loss
        self.iteration += 1
        return self.last

    def metrics(self) -> dict[str, Any]:
        return self.last.metrics()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "length": self.length, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the iteration count; the length stays as configured."""
        _check_kind(state, self.kind)
        self.iteration = int(state["iteration"])


class StepEvery:
    """Ablation: raise by ``step`` on every ``every``-th iteration (``every``, ``2*every``, ...) up to
    ``cap``, whatever the training signals say."""

    kind = "step"

    def __init__(self, every: int, step: int, cap: int, initial_length: int = 128) -> None:
        if every <= 0 or step <= 0 or not 0 < initial_length <= cap:
            raise ValueError(
                f"need every > 0, step > 0, 0 < initial_length <= cap; got {every}, {step}, {initial_length}, {cap}"
            )
        self.every, self.step, self.cap = every, step, cap
        self.length = initial_length
        self.iteration = 0
        self.last = LengthDecision(self.length, False, "schedule")

    def update(self, reward_mean: float, critic_loss: float) -> LengthDecision:
        del reward_mean, critic_loss
        self.iteration += 1
        if self.length >= self.cap:
            self.last = LengthDecision(self.length, False, "cap")
        elif self.iteration % self.every == 0:
            self.length = min(self.length + self.step, self.cap)
            self.last = LengthDecision(self.length, True, "increase")
        else:
            self.last = LengthDecision(self.length, False, "schedule")
        return self.last

    def metrics(self) -> dict[str, Any]:
        return self.last.metrics()

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "length": self.length,
            "iteration": self.iteration,
            "last": asdict(self.last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.length = int(state["length"])
        self.iteration = int(state["iteration"])
        self.last = LengthDecision(**state["last"])


def build_length_controller(cfg: LengthControlConfig) -> ContinuousMaximization | FixedLength | StepEvery:
    if cfg.kind == "cm":
        return ContinuousMaximization(cfg.cm)
    if cfg.kind == "fixed":
        return FixedLength(cfg.fixed_length)
    if cfg.kind == "step":
        return StepEvery(cfg.every, cfg.cm.step, cfg.cm.max_length, cfg.cm.initial_length)
    raise ValueError(f"unknown length controller kind {cfg.kind!r}; expected 'cm', 'fixed' or 'step'")


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"length controller state is for {state.get('kind')!r}, this controller is {kind!r}")
