"""The distributed optimizer on megatron's torch-Adam fallback resumes exactly with ``adam_fallback``, and
each of its fixes is needed (items 11-13 of shared/docs/megatron-core-0.16.1-on-cpu.md).

One DP=2 torchrun job (``workers/adamfix_resume.py``, about 40 s on 2 cores): an uninterrupted run saves
after step 2 in both sharding formats and trains to step 5; then, per scenario (all fixes, none, all but
one), a fresh model + optimizer loads the step-2 checkpoint and trains steps 3-5.
"""

from __future__ import annotations

import json

import pytest

from tests.launch import run_torchrun

FORMATS = ("dp_reshardable", "fully_reshardable")
SCENARIOS = ("all", "none", "-empty_state", "-per_param_step", "-keep_loaded_step", "-load_no_grad")
KILL_AT, STEPS = 2, 5


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("adamfix")
    stdout = run_torchrun("adamfix_resume.py", 2, [str(out), *SCENARIOS], timeout=300)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def max_diff(report: dict, resumed: dict, steps: range) -> float:
    return max(abs(resumed["losses"][str(s)] - report["reference"][str(s)]) for s in steps)


def test_apply_contract(report: dict) -> None:
    for scenario in SCENARIOS[2:]:
        install = report[scenario]["install"]
        assert install["with_fused_adam"] is False, scenario  # TE / apex FusedAdam: nothing to do
        assert install["with_fused_adam_untouched"], scenario
        assert install["applied"] is True and install["idempotent"], scenario
    assert report["all"]["dp_reshardable"]["is_applied"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_matches_uninterrupted_run(report: dict, fmt: str) -> None:
    resumed = report["all"][fmt]
    assert "error" not in resumed, resumed
    assert resumed["steps_after_load"] == {"values": [KILL_AT], "tensors": 8, "n": 8}
    assert max_diff(report, resumed, range(KILL_AT + 1, STEPS + 1)) <= 1e-6
    assert resumed["steps_at_end"]["values"] == [STEPS]


@pytest.mark.parametrize("scenario", ["none", "-empty_state"])
def test_without_empty_state_fix_the_load_asserts(report: dict, scenario: str) -> None:
    """Item 11: a fresh optimizer has no torch-Adam state; ``state_dict`` asserts on it."""
    for fmt in FORMATS:
        resumed = report[scenario][fmt]
        assert resumed.get("error", "").startswith("AssertionError"), resumed
        assert resumed["where"].startswith("state_dict: assert len(steps) == 1")


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_per_param_step_fix_training_diverges(report: dict, fmt: str) -> None:
    """Item 12: one shared ``step`` tensor is incremented once per parameter by torch Adam."""
    resumed = report["-per_param_step"][fmt]
    assert "error" not in resumed, resumed
    assert resumed["steps_after_load"]["tensors"] == 1  # all 8 parameter states share one tensor
    assert max_diff(report, resumed, range(KILL_AT + 1, KILL_AT + 2)) <= 1e-6  # the weights loaded fine
    assert max_diff(report, resumed, range(KILL_AT + 2, STEPS + 1)) > 1e-4  # the optimizer did not


def test_without_keep_loaded_step_fix(report: dict) -> None:
    """Item 12 (dp_reshardable: step silently reset to 0) and item 13 (fully_reshardable: KeyError)."""
    dp = report["-keep_loaded_step"]["dp_reshardable"]
    assert "error" not in dp, dp
    assert dp["steps_after_load"]["values"] == [0]
    assert max_diff(report, dp, range(KILL_AT + 2, STEPS + 1)) > 1e-4
    full = report["-keep_loaded_step"]["fully_reshardable"]
    assert full.get("error") == "KeyError: 'step'", full
    assert full["where"].startswith("_set_main_param_and_optimizer_states")


def test_without_load_no_grad_fix_dp_reshardable_fails_with_fp32_params(report: dict) -> None:
    resumed = report["-load_no_grad"]["dp_reshardable"]
    assert "a view of a leaf Variable that requires grad" in resumed.get("error", ""), resumed
    assert "error" not in report["-load_no_grad"]["fully_reshardable"]  # already @torch.no_grad() there
