"""Value head pieces that need no process group: the head itself and the last-real-token read.

The head inside a megatron model (sharded checkpoint, TP=2 / PP=2 equality, loading a GPT backbone) is
covered by ``test_training_parallel.py::test_tp2_and_pp2_match_tp1[train-rm]``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from c2f_megatron.models.value_head import ValueHead, gather_last, last_token_index


def test_last_token_of_right_padded_rows() -> None:
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    index = last_token_index(valid)
    assert index.tolist() == [2, 0, 3]
    values = torch.arange(12.0).view(3, 4, 1)
    assert gather_last(values, index).tolist() == [2.0, 4.0, 11.0]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.zeros(1, 3))


def test_head_is_deterministic_and_scalar() -> None:
    config = SimpleNamespace(hidden_size=8, params_dtype=torch.float32, sequence_parallel=False)
    a, b = ValueHead(config, 0.02, seed=0), ValueHead(config, 0.02, seed=0)
    assert torch.equal(a.weight, b.weight)  # same on every TP rank
    assert a.weight.shape == (1, 8)
    hidden = torch.randn(5, 2, 8)  # [s, b, h]
    values, bias = a(hidden)
    assert bias is None and values.shape == (5, 2, 1) and values.dtype == torch.float32
    assert torch.allclose(values, hidden @ a.weight.T)
