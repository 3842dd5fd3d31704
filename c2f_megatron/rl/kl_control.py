"""The KL penalty coefficient: fixed, or adapted towards a target KL (Ziegler et al. 2019; verl, TRL).

Both controllers share ``value``, ``update(current_kl, n_steps)`` and ``state_dict()/load_state_dict()`` so
the trainer never branches on the kind and a resumed run continues with the coefficient it stopped at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class KLControlConfig:
    """``fixed``: ``coef`` throughout. ``adaptive``: starts at ``coef``, steers the measured KL to ``target``.

    ``target`` must be in the unit the trainer passes to ``update`` (TRL's 6.0 is nats per response, the
    per-token KL summed over the response and averaged over the batch). ``horizon`` is in samples: an error
    held for ``horizon`` samples moves the coefficient by about ``e^error``.
    """

    kind: Literal["fixed", "adaptive"] = "fixed"
    coef: float = 0.05
    target: float = 6.0
    horizon: int = 10000

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"kl coef must be >= 0, got {self.coef}")
        if self.kind == "adaptive" and (self.target <= 0 or self.horizon <= 0):
            raise ValueError(
                f"adaptive KL needs target > 0 and horizon > 0, got {self.target}, {self.horizon}"
            )


class FixedKLController:
    """A constant coefficient; ``update`` is a no-op so the trainer can call it unconditionally."""

    kind = "fixed"

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional control: ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``.

    The clip bounds one update's change however far the KL is from the target (a single bad batch cannot
    blow up the coefficient); ``n_steps`` is the number of samples since the last update.
    """

    kind = "adaptive"
    max_error = 0.2

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -self.max_error), self.max_error)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the coefficient; target/horizon stay as configured (a resume may change them)."""
        _check_kind(state, self.kind)
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def build_kl_controller(cfg: KLControlConfig) -> KLController:
    if cfg.kind == "fixed":
        return FixedKLController(cfg.coef)
    if cfg.kind == "adaptive":
        return AdaptiveKLController(cfg.coef, cfg.target, cfg.horizon)
    raise ValueError(f"unknown KL controller kind {cfg.kind!r}; expected 'fixed' or 'adaptive'")


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"KL controller state is for {state.get('kind')!r}, this controller is {kind!r}")
