"""SDPA spec vs megatron's local spec, and both against a direct slow Mistral forward with a sliding
window shorter than the sequence (HF W = megatron (W-1, 0))."""

from __future__ import annotations

import json

import pytest

from c2f_megatron.models.specs import resolve_layer_spec, transformer_engine_available
from tests.launch import run_python


@pytest.fixture(scope="module")
def diffs() -> dict[str, float]:
    return json.loads(run_python("spec_worker.py", []).strip().splitlines()[-1])


def test_sdpa_equals_local_causal(diffs):
    assert diffs["sdpa_vs_local_causal"] <= 1e-5


def test_sliding_window_matches_reference(diffs):
    assert diffs["local_window_vs_reference"] <= 1e-5
    assert diffs["sdpa_window_vs_reference"] <= 1e-5


def test_window_off_by_one_is_detected(diffs):
    # W+1 must not pass as W: guards the (W-1, 0) translation
    assert diffs["window_plus_one_vs_reference"] > 1e-3


def test_left_padding_mask(diffs):
    assert diffs["sdpa_vs_local_left_padding"] <= 1e-5
    assert diffs["sdpa_left_padding_finite"] == 1.0


def test_auto_spec_resolution():
    expected = "te" if transformer_engine_available() else "sdpa"
    assert resolve_layer_spec("auto") == expected
    assert resolve_layer_spec("local") == "local"
    with pytest.raises(ValueError, match="unknown layer_spec"):
        resolve_layer_spec("flash")  # type: ignore[arg-type]
    if not transformer_engine_available():
        with pytest.raises(RuntimeError, match="transformer_engine does not import"):
            resolve_layer_spec("te")
