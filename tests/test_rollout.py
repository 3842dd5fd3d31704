"""Rollout generation: KV cache == recomputation (TP1, TP2, PP2), padding, stop handling, coarse mode.

The model runs in ``tests/workers/rollout_checks.py`` (a fresh process per layout); these tests assert on
the JSON it prints. The mask/config helpers are checked here directly.
"""

from __future__ import annotations

import json

import pytest
import torch

from c2f_megatron.generation.rollout import (
    GenerationConfig,
    RolloutBatch,
    padded_causal_mask,
)
from tests.launch import run_python, run_torchrun


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"worker printed no RESULT line:\n{stdout[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def tp1() -> dict:
    return _result(run_python("rollout_checks.py", [], timeout=300))


@pytest.fixture(scope="module")
def tp2() -> dict:
    return _result(run_torchrun("rollout_checks.py", 2, ["--tp", "2"], timeout=300))


@pytest.fixture(scope="module")
def pp2() -> dict:
    return _result(run_torchrun("rollout_checks.py", 2, ["--pp", "2"], timeout=300))


def test_cached_greedy_equals_full_recompute_tp1(tp1: dict) -> None:
    assert tp1["greedy_equal"], f"{tp1['greedy_mismatches']} tokens differ from full recomputation"
    assert tp1["window_greedy_equal"], "sliding-window model: cached decoding differs from recomputation"


def test_cached_greedy_equals_full_recompute_tp2(tp2: dict) -> None:
    assert tp2["greedy_equal"], f"{tp2['greedy_mismatches']} tokens differ from full recomputation at TP=2"


def test_cached_greedy_equals_full_recompute_pp2(pp2: dict) -> None:
    assert pp2["greedy_equal"], f"{pp2['greedy_mismatches']} tokens differ from full recomputation at PP=2"
    assert pp2["per_prompt_equal"]


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_continuous_batching_equals_prompts_generated_alone(
    layout: str, request: pytest.FixtureRequest
) -> None:
    out = request.getfixturevalue(layout)
    assert out["continuous_equal_alone"], f"{layout}: continuous batching changed a greedy response"
    lengths = out["continuous_lengths"]
    assert min(lengths) < max(lengths) == 12, f"{layout}: no row stopped early ({lengths}), nothing refilled"
    assert out["continuous_sampling_batch_free"], f"{layout}: a sample depends on max_batch"


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_packed_decode_gemms_equal_the_modules_products(layout: str, request: pytest.FixtureRequest) -> None:
    out = request.getfixturevalue(layout)
    check = out["packed_gemm"]
    if out["device"] == "cpu":  # fp32 on CPU: on by default; on GPU the modules' own GEMMs run
        assert check["available"] and check["default_on"], f"{layout}: CPU fp32 decoding without packed GEMMs"
    assert check["gap"] < 1e-5, f"{layout}: packed GEMM logits differ by {check['gap']:.2e} (relative)"
    assert check["restored"], f"{layout}: a layer's linear module is still shadowed after decoding"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_cuda_graph_decode_equals_eager(layout: str, request: pytest.FixtureRequest) -> None:
    out = request.getfixturevalue(layout)
    assert out["device"] == "cuda", f"{layout}: the worker ran on {out['device']} although a GPU is visible"
    assert out["cuda_graph_greedy_equal"], f"{layout}: CUDA-graph greedy rollout differs from eager"
    assert out["cuda_graph_sampled_equal"], f"{layout}: CUDA-graph sampled rollout differs from eager"
    assert out["cuda_graph_continuous_equal"], f"{layout}: CUDA-graph continuous batching differs"


def test_left_padded_rows_equal_prompts_generated_alone(tp1: dict, tp2: dict) -> None:
    assert tp1["per_prompt_equal"] and tp2["per_prompt_equal"]


def test_trainer_forward_on_rollout_layout_reproduces_sampler_logprobs(tp1: dict) -> None:
    assert tp1["trainer_argmax_equal"]
    assert tp1["trainer_logprob_gap"] < 1e-4


def test_generate_restores_train_mode_and_refuses_bad_input(tp1: dict) -> None:
    assert tp1["train_mode_restored"]
    # model chunk list (VPP), prompt + new tokens too long, id outside the vocab, empty prompt
    assert tp1["refusals"] == [True, True, True, True]
    if tp1["device"] == "cpu":
        assert tp1["cuda_graph_refused"], "generation.cuda_graph on a CPU model was not refused in one line"


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_stop_id_ends_only_that_sequence(layout: str, request: pytest.FixtureRequest) -> None:
    r = request.getfixturevalue(layout)
    assert r["stop_lengths"] == r["stop_expected_lengths"]
    assert r["stop_mask_ok"], "response_mask/tokens after a stop are wrong, or other rows changed"
    assert r["stop_width"] == 12  # max_new_tokens respected
    expected_limit = [n == 12 for n in r["stop_expected_lengths"]]
    assert r["stop_hit_limit"] == expected_limit
    assert not all(expected_limit) and any(expected_limit)  # the case mixes stopped and cut rows


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_coarse_mode_never_samples_eos_or_stop_ids(layout: str, request: pytest.FixtureRequest) -> None:
    r = request.getfixturevalue(layout)
    assert r["free_eos_fraction"] > 0.2, "without suppression the boosted EOS should be sampled often"
    assert r["coarse_count"] >= 3000
    assert r["coarse_bad"] == 0, "EOS, a stop id or a padded-vocab id was sampled in coarse mode"
    assert r["coarse_all_hit_limit"]
    assert r["coarse_distinct"] > 100  # genuinely sampled, not a degenerate loop
    assert r["sampling_reproducible"]


def test_padded_causal_mask_matches_direct_definition() -> None:
    key_is_pad = torch.tensor([[True, True, False, False, False], [False, False, False, False, False]])
    full = padded_causal_mask(key_is_pad)
    for b in range(2):
        for q in range(5):
            for k in range(5):
                assert bool(full[b, 0, q, k]) == (k > q or bool(key_is_pad[b, k]))
    decode = padded_causal_mask(key_is_pad, 3, 4)  # one query (slot 3) over keys 0..3
    assert decode.shape == (2, 1, 1, 4)
    assert torch.equal(decode, full[:, :, 3:4, :4])


def test_rollout_batch_helpers() -> None:
    batch = RolloutBatch(
        tokens=torch.tensor([[0, 5, 6, 7, 2, 0], [4, 5, 6, 8, 9, 9]]),
        prompt_mask=torch.tensor([[False, True, True], [True, True, True]]),
        response_mask=torch.tensor([[True, True, False], [True, True, True]]),
        response_lengths=torch.tensor([2, 3]),
        hit_limit=torch.tensor([False, True]),
        logprobs=torch.zeros(2, 3),
    )
    assert batch.prompt_width == 3
    assert batch.response_ids() == [[7, 2], [8, 9, 9]]
    mask = batch.attention_mask()
    assert mask.shape == (2, 1, 6, 6)
    assert bool(mask[0, 0, 3, 0]) and not bool(mask[0, 0, 3, 1])  # left pad masked, prompt visible


def test_generation_config_validation() -> None:
    with pytest.raises(ValueError, match="suppressed and stop"):
        GenerationConfig(8, suppress_ids=[2], stop_ids=[2])
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(4, top_p=0.0)
