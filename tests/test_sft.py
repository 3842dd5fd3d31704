"""SFT: the loss covers response tokens + EOS only (checked against a direct computation), truncation keeps
the end of the prompt, and a short ``c2f train-sft`` run on HH-RLHF trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from c2f_megatron.training.tasks.sft import build_example, collate_sft
from tests.launch import run_python


def test_build_example_keeps_prompt_end_and_eos() -> None:
    ex = build_example(list(range(10, 30)), [100, 101, 102], bos_id=1, eos_id=2, seq_length=11)
    assert ex.ids == (
        1,
        23,
        24,
        25,
        26,
        27,
        28,
        29,
        100,
        101,
        102,
        2,
    )  # BOS + the prompt's end + response + EOS
    assert ex.prompt_len == 8
    long = build_example([5] * 4, list(range(100, 200)), bos_id=1, eos_id=2, seq_length=15)
    assert len(long.ids) == 16 and long.ids[: long.prompt_len] == (1, 5, 5, 5, 5)  # short prompt kept whole


def test_collate_masks_prompt_and_padding() -> None:
    ex = build_example([10, 11, 12], [20, 21], bos_id=1, eos_id=2, seq_length=8)
    batch = collate_sft([ex], seq_length=8, pad_id=0, device=torch.device("cpu"))
    assert batch["tokens"][0].tolist() == [1, 10, 11, 12, 20, 21, 2, 0]
    assert batch["labels"][0].tolist() == [10, 11, 12, 20, 21, 2, 0, 0]
    assert batch["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]


def test_token_loss_matches_direct_computation(shared_data: Path) -> None:
    source = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    out = run_python("train_sft_loss.py", [str(source)], timeout=300)
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert result["all_rows"], result
    assert all(all(c.values()) for c in result["checks"]), result["checks"]
    assert result["n"] == result["count"] > 0
    assert result["loss_sum"] == pytest.approx(result["direct"], rel=1e-5)


def test_train_sft_cli_short_run(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        "model: {preset: mistral-nano, overrides: {layer_spec: local}}\n"
        "optim: {lr: 3.0e-3, warmup_steps: 2}\n"
        "train: {train_steps: 12, micro_batch_size: 4, global_batch_size: 8, seq_length: 64, log_interval: 4}\n"
        f"data: {{hh: {{source: {source}, split: null, max_pairs: 200, eval_fraction: 0.1}}}}\n"
        f"checkpoint: {{dir: {tmp_path / 'ckpt'}}}\nlogging: {{run_dir: {tmp_path / 'run'}}}\n"
    )
    run_python("train_cli.py", ["train-sft", str(cfg)], timeout=300)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train[-1] < train[0]
    assert any("eval/loss" in r for r in rows)
    meta = json.loads((tmp_path / "ckpt" / "step_0000012" / "c2f_checkpoint.json").read_text())
    assert meta["kind"] == "gpt" and meta["tokenizer"]["vocab_size"] == 32000


def test_bad_config_names_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train: {train_stepz: 3}\n")
    with pytest.raises(AssertionError) as err:
        run_python("train_cli.py", ["train-sft", str(cfg)], timeout=120)
    assert "train_stepz" in str(err.value) and "Traceback" not in str(err.value)
