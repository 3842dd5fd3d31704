"""Latest-checkpoint discovery accepts only complete step directories; pruning keeps the newest K."""

from __future__ import annotations

import json
from pathlib import Path

from c2f_megatron.checkpoint.steps import latest_checkpoint, list_checkpoints, step_dir
from c2f_megatron.training.checkpointing import prune_checkpoints


def make_step(root: Path, step: int, models: list[str] = ("",), complete: bool = True) -> Path:
    path = step_dir(root, step)
    for name in models:
        (path / name / "model").mkdir(parents=True, exist_ok=True)
        (path / name / "c2f_checkpoint.json").write_text("{}")
    if complete:
        (path / "trainer_state.json").write_text(
            json.dumps({"step": step, "consumed_samples": 0, "models": list(models)})
        )
    return path


def test_incomplete_and_partial_dirs_are_never_latest(tmp_path: Path) -> None:
    make_step(tmp_path, 10)
    make_step(tmp_path, 20)
    (tmp_path / "step_0000030.partial" / "model").mkdir(parents=True)  # crash mid-save
    make_step(tmp_path, 40, complete=False)  # no trainer_state.json
    actor_only = make_step(tmp_path, 50, models=["actor", "critic"])
    (actor_only / "critic" / "c2f_checkpoint.json").unlink()  # one model's metadata missing
    (tmp_path / "step_0000060").mkdir()
    (tmp_path / "step_0000060" / "trainer_state.json").write_text("{not json")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_0000020"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_multi_model_step_is_complete(tmp_path: Path) -> None:
    make_step(tmp_path, 5, models=["actor", "critic"])
    assert latest_checkpoint(tmp_path) == tmp_path / "step_0000005"


def test_prune_keeps_last_k_and_drops_stale_partials(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        make_step(tmp_path, step)
    (tmp_path / "step_0000002.partial").mkdir()
    (tmp_path / "step_0000009.partial").mkdir()  # newer than the latest: maybe being written, keep
    prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert not (tmp_path / "step_0000002.partial").exists()
    assert (tmp_path / "step_0000009.partial").exists()


def test_rng_state_round_trips_and_a_crafted_rng_file_cannot_run_code(tmp_path):
    """RNG files hold tensors and plain types only and load with ``weights_only``: a pickle that would run
    a command on auto-resume is refused in one line naming the file, and the command never runs."""
    import os
    import random

    import numpy as np
    import pytest
    import torch

    from c2f_megatron.checkpoint.megatron_dir import CheckpointError
    from c2f_megatron.training import checkpointing as ck

    path = tmp_path / "rank_00000.pt"
    torch.save(ck.rng_state(), path)
    expected = (np.random.rand(3), random.random(), torch.rand(2))
    ck.set_rng_state(ck._load_rng_file(path))
    assert (np.random.rand(3) == expected[0]).all() and random.random() == expected[1]
    assert torch.equal(torch.rand(2), expected[2])

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"python": Payload()}, evil)
    with pytest.raises(CheckpointError, match=f"{evil}: not a plain RNG state file"):
        ck._load_rng_file(evil)
    assert not marker.exists()
