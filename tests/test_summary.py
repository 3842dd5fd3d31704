"""The console line, the end-of-job summary (``training/summary.py``), and the skipped-records file."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

from c2f_megatron.data.hh_rlhf import load_hh_rlhf
from c2f_megatron.models.specs import describe_layer_spec
from c2f_megatron.rl.ppo_trainer import CONSOLE_KEYS as PPO_KEYS
from c2f_megatron.training.config import LoggingConfig
from c2f_megatron.training.logging import CONSOLE_WIDTH, MetricsLogger
from c2f_megatron.training.summary import RunSummary, Sample, plot_ppo_curves, read_metrics_jsonl, start_end

# A PPO record as the trainer logs it: ~45 metrics.
PPO_RECORD = {f"metric_{i}": 0.123456789 * i for i in range(40)} | {
    "reward_raw_mean": -1.2345678,
    "vf_loss": 0.03456,
    "kl": 0.00123,
    "entropy": 2.3456,
    "response_length_mean": 48.0,
    "rollout_length_limit": 48.0,
    "tokens_per_s": 812.5,
}


def _logger(tmp_path: Path, verbose: bool = False, keys=PPO_KEYS) -> tuple[MetricsLogger, io.StringIO]:
    out = io.StringIO()
    cfg = LoggingConfig(wandb_mode="disabled", run_dir=str(tmp_path), verbose=verbose)
    return MetricsLogger(cfg, 20, stream=out, console_keys=keys, unit="iter"), out


def test_console_line_is_compact_and_verbose_brings_everything_back(tmp_path):
    log, out = _logger(tmp_path)
    log.log(3, PPO_RECORD)
    line = out.getvalue().strip()
    assert len(line) <= CONSOLE_WIDTH and line.startswith("iter  3/20 | ")
    assert "rm -1.235 | vf 0.03456 | kl 0.00123 | ent 2.346 | len 48 | limit 48 | tok/s 812.5" in line
    assert "metric_1" not in line
    verbose, out = _logger(tmp_path, verbose=True)
    verbose.log(3, PPO_RECORD)
    assert "metric_39" in out.getvalue() and len(out.getvalue()) > 3 * CONSOLE_WIDTH
    log.close()
    verbose.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(len(json.loads(x)) == len(PPO_RECORD) + 1 for x in lines)


def test_a_record_without_the_key_metrics_shows_its_first_ones_within_the_width(tmp_path):
    log, out = _logger(tmp_path)
    log.log(5, {f"m{i}": float(i) for i in range(60)}, prefix="eval")
    line = out.getvalue().strip()
    assert line.startswith("eval @ iter 5 | m0 0 | m1 1") and len(line) <= CONSOLE_WIDTH
    log.close()


def test_start_end_takes_the_last_record_of_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 1, "train/loss": 3.0},
        {"step": 2, "train/loss": 2.0},
        {"step": 2, "eval/loss": 9.0},
        {"step": 2, "train/loss": 2.5},  # the resumed run's step 2
        {"step": 3, "train/loss": 1.0, "train/accuracy": 0.75},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = read_metrics_jsonl(path, "train")
    assert start_end(train, ["loss", "accuracy", "absent"]) == [("loss", 3.0, 1.0), ("accuracy", 0.75, 0.75)]
    assert [r["loss"] for r in read_metrics_jsonl(path, "eval")] == [9.0]


def test_summary_block_and_markdown(tmp_path):
    records = [
        {"step": i, "reward_mean": 0.1 * i, "vf_loss": 1.0 / i, "rollout_length_limit": 16 * ((i + 1) // 2)}
        for i in range(1, 7)
    ]
    plot = plot_ppo_curves({"coarse-actor": records}, tmp_path / "ppo_curves.png")
    summary = RunSummary(
        "coarse-actor",
        tmp_path,
        754.2,
        "6/6 iterations",
        {"checkpoint": "runs/x/checkpoints/step_0000006", "plot": str(plot)},
        start_end(records, ["reward_mean", "rollout_length_limit"]),
        [Sample("iteration 1: 16 tokens", "Why is the sky blue?", "Because of\nRayleigh scattering.")],
    )
    text = summary.console()
    assert text.splitlines()[0].startswith("=") and " c2f coarse-actor: 6/6 iterations in 12:34 " in text
    assert "rollout_length_limit" in text and "16.0000" in text and "48.0000" in text
    assert "response: Because of Rayleigh scattering." in text
    md = summary.write().read_text()
    assert md.startswith("# c2f coarse-actor") and "| reward_mean | 0.1000 | 0.6000 |" in md
    assert "> Because of\n> Rayleigh scattering." in md
    assert plot.stat().st_size > 1000


def test_skipped_records_go_to_a_file_and_the_log_gets_one_line(tmp_path, caplog):
    src = tmp_path / "pairs.jsonl.gz"
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}
    lines = [json.dumps(good), "{not json", json.dumps({"chosen": "x"}), json.dumps(good)]
    with gzip.open(src, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    listing = tmp_path / "run" / "skipped_records.txt"
    with caplog.at_level("WARNING"):
        result = load_hh_rlhf(str(src), skipped_log=listing)
    assert len(result.pairs) == 2 and len(result.malformed) == 2
    (message,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in message and "2 malformed record(s) skipped" in message and str(listing) in message
    text = listing.read_text()
    assert f"{src}:2" in text and f"{src}:3" in text


def test_layer_spec_line_says_what_runs_and_why():
    assert describe_layer_spec("auto", "sdpa").startswith(
        "layer spec: sdpa (auto: no Transformer Engine here)"
    )
    assert "model.layer_spec=local" in describe_layer_spec("local", "local")
    assert "\n" not in describe_layer_spec("auto", "te")


def test_a_resumed_job_keeps_its_wandb_run_id(tmp_path):
    from c2f_megatron.training.logging import WANDB_ID_FILE, wandb_run_id

    first = wandb_run_id(tmp_path)
    assert len(first) == 16 and (tmp_path / WANDB_ID_FILE).read_text().strip() == first
    assert wandb_run_id(tmp_path) == first  # the requeued job finds it again
    (tmp_path / "other").mkdir()
    assert wandb_run_id(tmp_path / "other") != first


def test_the_wandb_id_is_the_run_dirs_else_the_checkpoints_else_new(tmp_path):
    from c2f_megatron.training.logging import WANDB_ID_FILE, wandb_run_id

    requeued = tmp_path / "requeued"  # a new run directory: the resumed checkpoint's id continues its run
    assert wandb_run_id(requeued, from_checkpoint="abc123") == "abc123"
    assert (requeued / WANDB_ID_FILE).read_text().strip() == "abc123"
    assert wandb_run_id(requeued, from_checkpoint="other") == "abc123"  # the run directory's file wins
    assert wandb_run_id(tmp_path / "fresh", from_checkpoint=None) not in ("abc123", "other")


def test_the_logger_names_the_id_for_the_next_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = LoggingConfig(wandb_mode="offline", run_dir=str(tmp_path))
    log = MetricsLogger(cfg, 10, checkpoint_run_id="abc123")
    assert log.run_id == "abc123"  # wandb off: the checkpoint's id is carried to the next checkpoint
    log.log_table(1, "samples", ["a"], [[1]])  # no wandb: a no-op
    log.close()
    assert not (tmp_path / "wandb_run_id").exists()
