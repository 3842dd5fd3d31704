"""The one checkpoint resolver and the one tokenizer check every command uses (``checkpoint.resolve``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from c2f_megatron.checkpoint.megatron_dir import CheckpointError, CheckpointMetadata
from c2f_megatron.checkpoint.resolve import check_tokenizer, resolve_checkpoint
from c2f_megatron.models.config import ModelConfig


def _ckpt(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "c2f_checkpoint.json").write_text("{}")
    return path


def _step(root: Path, step: int, models: tuple[str, ...] = ("",)) -> Path:
    d = root / f"step_{step:07d}"
    for m in models:
        _ckpt(d / m if m else d)
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "models": list(models)}))
    return d


def test_checkpoint_root_and_role(tmp_path: Path) -> None:
    plain = _ckpt(tmp_path / "plain")
    assert resolve_checkpoint(plain) == plain
    assert resolve_checkpoint(plain, "actor") == plain  # no role inside: the checkpoint itself
    rm_root = tmp_path / "rm"
    _step(rm_root, 10)
    newest = _step(rm_root, 20)
    (rm_root / "step_0000030.partial").mkdir()  # never complete
    assert resolve_checkpoint(rm_root, "reward") == newest
    ppo_root = tmp_path / "ppo"
    step = _step(ppo_root, 4, ("actor", "critic"))
    assert resolve_checkpoint(ppo_root, "actor") == step / "actor"
    assert resolve_checkpoint(step, "critic") == step / "critic"
    assert resolve_checkpoint(step / "actor") == step / "actor"


def test_refusals_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"^actor.init_from: .*nowhere: checkpoint directory not found"):
        resolve_checkpoint(tmp_path / "nowhere", "actor", "actor.init_from")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        CheckpointError, match="neither a c2f checkpoint .* nor a root holding complete step_"
    ):
        resolve_checkpoint(tmp_path / "empty", field="reward.path")


def test_tokenizer_check() -> None:
    meta = CheckpointMetadata(ModelConfig(vocab_size=100), tokenizer={"fingerprint": "a", "vocab_size": 90})
    check_tokenizer({"name": "t", "fingerprint": "a", "vocab_size": 90, "eos_id": 2}, meta, "x")
    check_tokenizer(None, meta, "x")  # synthetic prompts: nothing to compare
    with pytest.raises(CheckpointError, match=r"x: field tokenizer.fingerprint is 'a' but .* has 'b'"):
        check_tokenizer({"name": "t", "fingerprint": "b", "vocab_size": 90}, meta, "x")
    with pytest.raises(CheckpointError, match="model.vocab_size 100 is smaller than the tokenizer's 120 ids"):
        check_tokenizer({"vocab_size": 120}, CheckpointMetadata(ModelConfig(vocab_size=100)), "model")
