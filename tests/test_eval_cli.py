"""``c2f eval`` on Megatron checkpoints: backend consistency (TP/PP), the CLI's table, MT-Bench judging."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT, run_python, run_torchrun, worker_env


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_ckpts")
    run_python("eval_make_ckpts.py", [str(out)], timeout=300)
    return out


def test_backend_consistency_single_process(ckpts):
    assert "EVAL_MODEL_CHECKS_OK 1 1" in run_python(
        "eval_model_checks.py", [str(ckpts), "1", "1"], timeout=300
    )


def test_backend_consistency_pipeline_parallel(ckpts):
    """Checkpoints saved at TP1/PP1 load at PP2; results reach rank 0 on the first stage."""
    assert "EVAL_MODEL_CHECKS_OK 1 2" in run_torchrun(
        "eval_model_checks.py", 2, [str(ckpts), "1", "2"], timeout=300
    )


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that rates every answer 6."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.requests.append(body)
        payload = json.dumps({"choices": [{"message": {"content": "Fine. Rating: [[6]]"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_eval_cli_table(ckpts, shared_data, tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "eval"
    args = [
        "--checkpoint",
        str(ckpts / "lm"),
        "--rm",
        str(ckpts / "rm"),
        "--baseline",
        str(ckpts / "lm"),
        "--out",
        str(out),
        "--name",
        "tiny",
        f"responses.hh.source={shared_data / 'hh-rlhf/harmless-base/test.jsonl.gz'}",
        "responses.hh.split=null",
        "responses.hh.eval_fraction=0.1",
        "responses.hh.max_pairs=300",
        "responses.num_prompts=5",
        "responses.num_references=3",
        "responses.max_new_tokens=8",
        "benchmarks.names=[arc_easy]",
        "benchmarks.limit=4",
        f"benchmarks.data_dir={shared_data}",
        f"mt_bench.base_url=http://127.0.0.1:{server.server_port}/v1",
        "mt_bench.model=judge-x",
        "mt_bench.limit=1",
        "mt_bench.max_new_tokens=4",
        f"mt_bench.questions={shared_data}/mt_bench/question.jsonl",
        f"mt_bench.judge_prompts={shared_data}/mt_bench/judge_prompts.jsonl",
        f"mt_bench.reference_answers={shared_data}/mt_bench/reference_answer/gpt-4.jsonl",
    ]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "c2f_megatron.cli", "eval", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=worker_env(2),
            cwd=REPO_ROOT,
        )
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((out / "eval.json").read_text())
    assert (out / "eval.md").is_file() and (out / "eval.csv").is_file()
    assert doc["model"] == "tiny" and doc["seed"] == 0 and doc["config"]["responses"]["num_prompts"] == 5
    (row,) = doc["rows"]
    assert row["n_prompts"] == 5
    assert row["win_rate"] == 0.5  # same greedy model on both sides: every pair ties
    assert 1 <= row["length_mean"] <= 8 and 0 <= row["eos_fraction"] <= 1 and 0 <= row["redundancy"] <= 1
    assert 0 < row["distinct_1"] <= 1 and row["perplexity"] > 1
    assert row["arc_easy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert row["mt_bench"] == 6.0
    assert len(_Judge.requests) == 2 and {r["model"] for r in _Judge.requests} == {"judge-x"}
    responses = json.loads((out / "responses.json").read_text())
    assert len(responses["prompts"]) == 5 and len(responses["rewards"]) == 5
    assert row["reward_mean"] == pytest.approx(sum(responses["rewards"]) / 5)


def test_eval_cli_refuses_missing_checkpoint(tmp_path):
    from c2f_megatron.eval.cli import main

    assert main(None, [f"out_dir={tmp_path}"]) == 2
    assert main(None, ["responses.num_prompts=0"]) == 2
