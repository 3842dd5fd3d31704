"""Merge arithmetic (bitwise against the direct torch formulas) and gamma parsing."""

from __future__ import annotations

import pytest
import torch

from c2f_megatron.merge.gamma import GammaError, gamma_name, output_dirs, parse_gammas
from c2f_megatron.merge.math import ChunkedMerger, linear, task_vector, weighted
from c2f_megatron.merge.recipe import MergeRecipe


def _rand(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunked_linear_is_bitwise_the_direct_formula(dtype):
    a, b = _rand(1001, dtype, 1), _rand(1001, dtype, 2)
    gammas = [0.0, 0.1, 0.3, 0.7, 1.0]
    merger = ChunkedMerger([MergeRecipe("weighted", (g, 1.0 - g)) for g in gammas], chunk=64)
    fp32_outs = [torch.empty(1001) for _ in gammas]
    low_outs = [torch.empty(1001, dtype=dtype) for _ in gammas]
    merger.merge([a, b], fp32_outs)
    merger.merge([a, b], low_outs)
    for g, y32, y in zip(gammas, fp32_outs, low_outs):
        direct = g * a.float() + (1 - g) * b.float()
        assert torch.equal(y32, direct)
        assert torch.equal(linear(a, b, g), direct)
        assert torch.equal(y, direct.to(dtype))  # rounded once, from the fp32 result
    assert torch.equal(fp32_outs[0], b.float()) and torch.equal(fp32_outs[-1], a.float())


def test_fused_or_reordered_formulas_would_differ():
    """The tests above can fail: other ways of writing the merge give other bits on these inputs."""
    a, b = _rand(4096, torch.float32, 3), _rand(4096, torch.float32, 4)
    direct = 0.7 * a + (1 - 0.7) * b
    assert not torch.equal(direct, torch.lerp(b, a, 0.7))
    assert not torch.equal(direct, b + 0.7 * (a - b))


def test_weighted_and_task_vector_chunked_match_reference():
    xs = [_rand(777, torch.bfloat16, s) for s in range(3)]
    w = (0.5, 0.25, 0.25)
    y = torch.empty(777)
    ChunkedMerger([MergeRecipe("weighted", w)], chunk=100).merge(xs, [y])
    assert torch.equal(y, 0.5 * xs[0].float() + 0.25 * xs[1].float() + 0.25 * xs[2].float())
    assert torch.equal(weighted(xs, w), y)
    a, b, base = xs
    y_task = torch.empty(777, dtype=torch.bfloat16)
    ChunkedMerger([MergeRecipe("task", (0.7,))], chunk=100).merge([a, b, base], [y_task])
    direct = b.float() + 0.7 * (a.float() - base.float())
    assert torch.equal(task_vector(a, b, base, 0.7), direct)
    assert torch.equal(y_task, direct.bfloat16())


def test_in_place_merge_with_copied_inputs():
    a, b = _rand(500, torch.float32, 5), _rand(500, torch.float32, 6)
    expected = 0.7 * a + (1 - 0.7) * b
    out = b.clone()
    ChunkedMerger([MergeRecipe("weighted", (0.7, 1 - 0.7))], chunk=64, copy_inputs=True).merge(
        [a, out], [out]
    )
    assert torch.equal(out, expected)


def test_recipe_validation():
    with pytest.raises(ValueError, match="finite"):
        MergeRecipe("weighted", (float("nan"), 0.5))
    with pytest.raises(ValueError, match="kind"):
        MergeRecipe("ties", (0.5,))
    with pytest.raises(ValueError, match="one weight"):
        MergeRecipe("task", (0.5, 0.5))
    with pytest.raises(ValueError, match="same inputs"):
        ChunkedMerger([MergeRecipe("task", (0.5,)), MergeRecipe("weighted", (0.5, 0.5))])


def test_parse_gammas():
    assert parse_gammas("0.7") == [0.7]
    assert parse_gammas("0.1:0.9:0.1") == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert parse_gammas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_gammas("0.3, 0.7,0.3") == [0.3, 0.7]
    assert parse_gammas("0.704") == [0.7]
    assert [gamma_name(g) for g in parse_gammas("0.1:0.3:0.1")] == ["gamma_0.10", "gamma_0.20", "gamma_0.30"]
    assert output_dirs("o", [0.7]) == [output_dirs("o", [0.7])[0]] and str(output_dirs("o", [0.7])[0]) == "o"
    assert [p.name for p in output_dirs("o", [0.3, 0.7])] == ["gamma_0.30", "gamma_0.70"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("1.5", "outside"),
        ("-0.1", "outside"),
        ("0.5:1.2:0.5", "outside"),
        ("abc", "not a number"),
        ("0.1:0.9", "START:STOP:STEP"),
        ("0.1:0.9:0", "step"),
        ("0.9:0.1:0.1", "below"),
        ("", "empty"),
        ("nan", "finite"),
    ],
)
def test_parse_gammas_refuses(spec, message):
    with pytest.raises(GammaError, match=message):
        parse_gammas(spec)


@pytest.mark.parametrize(
    "dtype, view, bits",
    [
        (torch.bfloat16, torch.int16, 0x7FC0),
        (torch.float16, torch.int16, 0x7E00),
        (torch.float32, torch.int32, 0x7FC00000),
    ],
)
def test_nan_outputs_are_written_canonically(dtype, view, bits):
    """torch's own conversions write CPU-dependent NaN bits (bf16 0xFFFF on AVX-512); the merge pins them."""
    a = _rand(3000, torch.float32, 11)
    b = _rand(3000, torch.float32, 12)
    a[[0, 5, 1500, 2999]] = torch.tensor([float("nan"), -float("nan"), float("inf"), float("nan")])
    b[[5, 7, 1500]] = torch.tensor([float("nan"), float("inf"), -float("inf")])  # inf - inf: NaN too
    y = torch.empty(3000, dtype=dtype)
    ChunkedMerger([MergeRecipe("weighted", (0.7, 0.3))], chunk=1000).merge([a, b], [y])
    nan = torch.isnan(0.7 * a + 0.3 * b)
    assert int(nan.sum()) == 4 and torch.equal(torch.isnan(y), nan)
    assert set(y.view(view)[nan].tolist()) == {bits}
    assert torch.equal(y[~nan], (0.7 * a + 0.3 * b)[~nan].to(dtype))
