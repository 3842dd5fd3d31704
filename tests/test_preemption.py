"""PreemptionHandler: signals and the request file set the stop flag, ranks agree on it, the marker is
written; and a trainer asked to stop between two save steps checkpoints that step and exits 0 with the
marker. (Signal -> requeue -> resume with every step once, under real Slurm, is in test_slurm.py.)"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import pytest

from c2f_megatron.training.preemption import PreemptionHandler, parse_signals
from tests.launch import run_python, run_torchrun


def test_parse_signals() -> None:
    assert parse_signals("USR1,TERM") == [signal.SIGUSR1, signal.SIGTERM]
    assert parse_signals(["SIGUSR2", 15]) == [signal.SIGUSR2, signal.SIGTERM]
    assert parse_signals("none") == [] and parse_signals("") == []
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signals("USR3")


def test_signal_sets_flag_and_uninstall_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler(signals="USR1") as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested() and handler.should_stop()
        assert handler.reason() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_request_file_and_marker(tmp_path: Path) -> None:
    env = {
        "C2F_PREEMPT_REQUEST": str(tmp_path / "preempt.request"),
        "C2F_PREEMPT_MARKER": str(tmp_path / "run" / "preempted.json"),
        "C2F_PREEMPT_SIGNALS": "none",
    }
    handler = PreemptionHandler.from_env(env)
    assert handler.signals == [] and not handler.should_stop()
    (tmp_path / "preempt.request").touch()
    assert handler.should_stop()
    handler.mark_preempted(7, tmp_path / "ckpt" / "step_0000007")
    marker = json.loads((tmp_path / "run" / "preempted.json").read_text())
    assert marker["step"] == 7 and marker["checkpoint"].endswith("step_0000007")
    assert marker["reason"].startswith("request file")


AGREE_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    import torch.distributed as dist
    from c2f_megatron.training.preemption import PreemptionHandler

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    handler = PreemptionHandler(signals="USR1", marker_file=sys.argv[1])
    assert handler.should_stop() is False
    if rank == 1:  # the signal reaches one rank only
        os.kill(os.getpid(), signal.SIGUSR1)
    assert handler.should_stop() is True, rank
    handler.mark_preempted(3, None)
    print(f"rank {rank} agreed")
    dist.destroy_process_group()
    """
)


def test_ranks_agree(tmp_path: Path) -> None:
    worker = tmp_path / "agree.py"
    worker.write_text(AGREE_WORKER)
    out = run_torchrun(worker, 2, [str(tmp_path / "marker.json")], timeout=120)
    assert "rank 0 agreed" in out or "rank 1 agreed" in out
    assert json.loads((tmp_path / "marker.json").read_text())["reason"] == "another rank's request"


def test_trainer_stops_and_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(f"Line {i}: the quick fox counts {i * 3} lazy dogs." for i in range(120)))
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(
        "model: {preset: mistral-nano, overrides: {layer_spec: local}}\n"
        "optim: {lr: 1.0e-3, warmup_steps: 1}\n"
        "train: {train_steps: 4, micro_batch_size: 2, global_batch_size: 2, seq_length: 32, keep_last: 5}\n"
        f"data: {{paths: [{data}], eval_fraction: 0.05}}\n"
    )
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    args = ["train-lm", str(cfg), f"checkpoint.dir={ckpt}", f"logging.run_dir={run}"]
    request, marker = tmp_path / "preempt.request", tmp_path / "preempted.json"
    monkeypatch.setenv("C2F_PREEMPT_REQUEST", str(request))
    monkeypatch.setenv("C2F_PREEMPT_MARKER", str(marker))

    request.touch()  # asked before the first step ends: stop after step 1 (not a save step)
    out = run_python("train_cli.py", args, timeout=300)
    assert "checkpointed and stopping at step 1" in out
    assert json.loads(marker.read_text())["checkpoint"] == str(ckpt / "step_0000001")

    state = json.loads((ckpt / "step_0000001" / "trainer_state.json").read_text())
    assert state["step"] == 1 and not (ckpt / "step_0000002").exists()
    # resuming from it (next step 2, no step lost or repeated) is test_slurm.py's preemption test
