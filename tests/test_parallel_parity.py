"""One set of weights gives the same logits, loss and gradients at TP=1, TP=2, PP=2, TP2xPP2 and
interleaved PP2xVPP2, through megatron's real pipeline schedule with several micro-batches (CPU, gloo)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.launch import run_python, run_torchrun

MODEL = {
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 160,
    "vocab_size": 1003,  # not a multiple of 128: padded rows must not change the loss
    "max_position_embeddings": 64,
    "layer_spec": "local",
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    ckpt, out = root / "ckpt", root / "tp1.pt"
    run_python(
        "parity_worker.py", ["--init", "--ckpt", str(ckpt), "--out", str(out), "--model", json.dumps(MODEL)]
    )
    return root, torch.load(out)


@pytest.mark.parametrize(
    "nproc,layout",
    [
        (2, ["--tp", "2"]),
        (2, ["--pp", "2"]),
        (4, ["--tp", "2", "--pp", "2"]),
        (4, ["--pp", "2", "--vpp", "2"]),
    ],
    ids=["tp2", "pp2", "tp2xpp2", "pp2xvpp2"],
)
def test_layout_matches_tp1(reference, nproc, layout):
    root, ref = reference
    out = root / f"{'_'.join(layout)}.pt"
    run_torchrun(
        "parity_worker.py",
        nproc,
        [*layout, "--ckpt", str(root / "ckpt"), "--out", str(out), "--model", json.dumps(MODEL)],
    )
    got = torch.load(out)
    assert got["logits"].shape == ref["logits"].shape
    assert (got["logits"] - ref["logits"]).abs().max().item() <= 1e-5
    assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) <= 1e-5
    assert got["grad_sq"] == pytest.approx(ref["grad_sq"], rel=1e-5)
