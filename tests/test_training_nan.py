"""A NaN/inf loss or grad norm skips the update (parameters, optimizer state, LR schedule untouched), is
logged, and stops the run after ``train.max_consecutive_nan`` in a row."""

from __future__ import annotations

import json
from pathlib import Path

from tests.launch import run_python


def test_nan_steps_are_skipped_then_stop_the_run(tmp_path: Path) -> None:
    out = run_python("train_nan.py", [str(tmp_path / "run")], timeout=300)
    report = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert report["clean_skipped"] is False
    assert report["bad_skipped"] is True and report["bad_loss_finite"] is False
    assert report["unchanged"] and report["scheduler_unchanged"]
    assert report["recovered"]
    assert report["stopped_at"] == 7  # NaN from step 5, max_consecutive_nan=3
    assert "max_consecutive_nan=3" in report["message"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("train/skipped") == 1.0] == [5, 6, 7]
