"""``c2f plan``: every example built on the meta device at its TP/PP (exact parameter counts, checkpoint
keys, layer specs), the activation inventory against Korthikanti et al. (2022), and the weight, gradient
and optimizer bytes against the tensors a real CPU run allocates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from c2f_megatron.checkpoint.hf_mapping import dist_shapes
from c2f_megatron.models.config import ModelConfig
from c2f_megatron.plan import memory
from tests.launch import REPO_ROOT, run_python, run_torchrun, worker_env

EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


def hf_parameter_count(cfg: ModelConfig, kind: str) -> int:
    """Parameters of the HF model: ``ModelConfig.num_parameters`` (the ``...ForCausalLM`` count, pinned to
    Mistral-7B's below), or for ``...ForSequenceClassification`` the backbone and a ``[1, hidden]`` head."""
    lm = cfg.num_parameters()
    if kind != "value":
        return lm
    lm_head = cfg.vocab_size * cfg.hidden_size if cfg.untie_embeddings_and_output_weights else 0
    return lm - lm_head + cfg.hidden_size


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("plan") / "examples.json"
    run_python("plan_examples.py", ["--out", str(out), *map(str, EXAMPLES)], timeout=600)
    return json.loads(out.read_text())


def test_every_example_is_planned(planned) -> None:
    configs = {r["config"] for r in planned["roles"]}
    assert configs == {p.name for p in EXAMPLES}
    print(f"meta-device builds of {len(planned['roles'])} roles in {planned['seconds']:.1f} s")


def test_mistral_7b_has_the_hf_parameter_count(planned) -> None:
    actor = next(
        r for r in planned["roles"] if r["config"] == "coarse_actor_mistral7b.yaml" and r["role"] == "actor"
    )
    assert (actor["tp"], actor["pp"]) == (4, 1)
    assert actor["total_params"] == 7_241_732_096  # mistralai/Mistral-7B-v0.1, from its config.json
    sft = next(r for r in planned["roles"] if r["config"] == "sft_mistral7b.yaml")
    assert (sft["tp"], sft["pp"], sft["total_params"]) == (4, 2, 7_241_732_096)


def test_parameter_counts_match_the_hf_configs(planned) -> None:
    for r in planned["roles"]:
        cfg = ModelConfig(**r["model"])
        assert r["total_params"] == hf_parameter_count(cfg, r["kind"]), (r["job"], r["role"])


def test_sharded_keys_match_the_converters_mapping(planned) -> None:
    for r in planned["roles"]:
        cfg = ModelConfig(**r["model"])
        expected = {k: list(v) for k, v in dist_shapes(cfg, r["padded_vocab"]).items()}
        if r["kind"] == "value":
            expected.pop("output_layer.weight", None)
            expected["output_layer.weight"] = [1, cfg.hidden_size]
        assert r["keys"] == expected, (r["job"], r["role"])


def test_layer_specs_and_layers_per_rank(planned) -> None:
    attention = {"sdpa": "SDPADotProductAttention", "local": "DotProductAttention"}
    for r in planned["roles"]:
        cfg = ModelConfig(**r["model"])
        assert r["spec"] in attention, r  # no TE on this machine: auto is sdpa
        assert sum(r["layers"]) == cfg.num_layers * r["tp"], r["job"]
        for modules in r["modules"]:
            assert modules["core_attention"] == attention[r["spec"]]
            assert modules["input_layernorm"] == modules["pre_mlp_layernorm"] == "RMSNorm"
            assert modules["linear_qkv"] == "ColumnParallelLinear"


def test_plan_prints_the_7b_table() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "c2f_megatron.cli", "plan", "examples/coarse_actor_mistral7b.yaml", "--gpus", "16"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=worker_env(2), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for phase in ("| rollout |", "| scoring |", "| update |"):
        assert phase in proc.stdout
    assert "7,241,732,096 parameters" in proc.stdout
    assert "| update |" in proc.stdout and "NO |" not in proc.stdout  # fits on 80 GB as configured
    small = subprocess.run(
        [sys.executable, "-m", "c2f_megatron.cli", "plan", "examples/coarse_actor_mistral7b.yaml", "--gpus", "16",
         "--gpu-memory", "40"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=worker_env(2), timeout=300,
    )  # fmt: skip
    assert small.returncode == 0, small.stderr[-3000:]
    assert "update needs" in small.stdout
    assert "full recompute: parallel.recompute_granularity=full -> " in small.stdout
    assert "(fits)" in small.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "c2f_megatron.cli", "plan", "examples/coarse_actor_mistral7b.yaml", "--gpus", "6"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=worker_env(2), timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "c2f plan: --gpus 6 is not a multiple of parallel: tensor_model_parallel_size 4 x "
        "pipeline_model_parallel_size 1"
    ]


# ----------------------------------------------------------------------- activations: Korthikanti et al.

GPT = dict(
    gated=False,
    attention="unfused",
    attention_dropout=True,
    hidden_dropout=True,
    norm_stats=False,
    composite_norm=False,
    v_holds_qkv=False,
    rope_tables=False,
    mask_type_tensor=False,
)  # Korthikanti et al.'s GPT layer: what their count leaves out is off


def _gpt_shape(h: int, a: int) -> memory.LayerShape:
    return memory.LayerShape(hidden=h, heads=a, kv_heads=a, head_dim=h // a, ffn=4 * h, **GPT)


@pytest.mark.parametrize(
    "s,b,h,a,t", [(2048, 1, 12288, 96, 8), (4096, 2, 4096, 32, 4), (512, 4, 1024, 16, 2), (128, 1, 64, 4, 1)]
)
def test_layer_activations_equal_korthikanti(s: int, b: int, h: int, a: int, t: int) -> None:
    """Their Table 2 per layer (16-bit activations, 1-byte dropout masks)."""
    shape = _gpt_shape(h, a)
    total = lambda **kw: sum(memory.layer_activations(shape, s, b, **kw).values())  # noqa: E731
    sbh = s * b * h
    assert total(tp=1) == pytest.approx(sbh * (34 + 5 * a * s / h))  # no parallelism
    assert total(tp=t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))  # tensor parallel
    assert total(tp=t, sequence_parallel=True) == pytest.approx(sbh / t * (34 + 5 * a * s / h))
    assert total(tp=t, recompute="selective") == pytest.approx(sbh * (10 + 24 / t))
    assert total(tp=t, sequence_parallel=True, recompute="selective") == pytest.approx(sbh * 34 / t)
    assert total(tp=1, recompute="full") == pytest.approx(2 * sbh)


def test_mistral_layer_inventory() -> None:
    """Our layer (SwiGLU, GQA, torch SDPA, RMSNorm, no dropout) by hand, TP 4 + SP."""
    h, a, g, d, f, s, b, t = 4096, 32, 8, 128, 14336, 4096, 2, 4
    shape = memory.LayerShape(hidden=h, heads=a, kv_heads=g, head_dim=d, ffn=f)
    got = sum(memory.layer_activations(shape, s, b, t, True, None, 2).values())
    sb = s * b
    by_hand = (
        4 * sb * h * 2 / t  # two norm inputs, the qkv and fc1 inputs (the norms' outputs)
        + 2 * sb * h * 2 / t  # the normalised inputs torch's RMSNorm keeps for its weight gradient
        + 2 * sb * 4 / t  # fp32 norm statistics
        + sb * (a * d + g * d) * 2 / t  # rotated q, k
        + sb * (a * d + 2 * g * d) * 2 / t  # the qkv output, which v is a view of
        + 4 * s * d * 2  # rope cos / sin for q and k
        + sb * a * 4 / t  # the kernel's log-sum-exp
        + sb * a * d * 2 / t  # its output, the projection input (a view of it)
        + sb * (2 * f + f + f + f) * 2 / t  # fc1 output, silu(gate), the up copy, fc2 input
    )
    assert got == pytest.approx(by_hand)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_layer_inventory_equals_the_tensors_autograd_saves(tmp_path: Path, recompute: str) -> None:
    """One real layer (sdpa spec, fp32, CPU): every storage autograd keeps for the backward pass, counted
    by a saved-tensors hook, equals the inventory's total."""
    out = tmp_path / "saved.json"
    run_python("plan_saved.py", ["--recompute", recompute, "--out", str(out)], timeout=120)
    got = json.loads(out.read_text())
    assert got["measured"] == got["predicted"], got


def test_pipeline_micro_batches_in_flight() -> None:
    assert [memory.micro_batches_in_flight(4, r, 8) for r in range(4)] == [4, 3, 2, 1]
    assert memory.micro_batches_in_flight(4, 0, 2) == 2
    assert memory.micro_batches_in_flight(1, 0, 8) == 1
    # interleaved, 2 chunks per stage: megatron's warm-up (pp - r - 1) * 2 + (v - 1) * pp, plus one
    assert memory.micro_batches_in_flight(4, 0, 8, vpp=2) == (3 * 2 + 4 + 1) / 2


# ------------------------------------------------------- weights, gradients, optimizer: the real tensors


@pytest.mark.parametrize(
    "nproc,dtype,distributed", [(1, "bf16", False), (2, "bf16", True), (2, "fp32", True), (2, "fp32", False)]
)
def test_plan_bytes_equal_allocated_tensors(
    tmp_path: Path, nproc: int, dtype: str, distributed: bool
) -> None:
    args = ["--dtype", dtype] + (["--distributed"] if distributed else [])
    planned, real = tmp_path / "planned.json", tmp_path / "real.json"
    run_python("plan_bytes.py", ["--plan", "--dp", str(nproc), "--out", str(planned), *args], timeout=300)
    if nproc == 1:
        run_python("plan_bytes.py", ["--out", str(real), *args], timeout=300)
    else:
        run_torchrun("plan_bytes.py", nproc, ["--out", str(real), *args], timeout=300)
    p, r = json.loads(planned.read_text()), json.loads(real.read_text())
    assert r["weights"] == [p["weights"]] * nproc
    assert r["grads"] == [p["grads"]] * nproc
    assert r["optimizer"] == p["optimizer"]
