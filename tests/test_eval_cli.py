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


def _judge_reply(body: dict) -> str:
    """Scripted judgments: MT-Bench grades are 6, pairwise games say "[[A]]" (so a game and its swap never
    agree: a tie), rubric judgments fail conciseness and are garbled when the request's length is a
    multiple of 3 (counted as errors)."""
    from c2f_megatron.eval.rubric import CRITERIA, SYSTEM_PROMPT

    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    if system == SYSTEM_PROMPT:
        if len(user) % 3 == 0:
            return "Looks fine to me. [[PASS]]"
        return "\n".join(
            f"{c.capitalize()}: [[{'FAIL' if c == 'conciseness' else 'PASS'}]]" for c in CRITERIA
        )
    if "[[A]]" in system:
        return "Assistant A is better. [[A]]"
    return "Fine. Rating: [[6]]"


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint answering with ``_judge_reply``."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.requests.append(body)
        payload = json.dumps({"choices": [{"message": {"content": _judge_reply(body)}}]}).encode()
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
        f"judge.base_url=http://127.0.0.1:{server.server_port}/v1",
        "judge.model=judge-x",
        "judge.note='a stub judge, not a strong external one'",
        "rubric.limit=3",
        "rubric.weights={safety: 2}",
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
    assert row["mt_bench_win_rate"] == 0.5  # inconsistent games are ties
    # 2 grades (1 question x 2 turns), 4 pairwise games (2 turns x 2 orders), 3 rubric items x 2 models
    assert len(_Judge.requests) == 12 and {r["model"] for r in _Judge.requests} == {"judge-x"}
    assert {r["max_tokens"] for r in _Judge.requests} == {1024} and {
        r["temperature"] for r in _Judge.requests
    } == {0}
    mt = json.loads((out / "mt_bench.json").read_text())
    assert mt["judge"]["note"] == "a stub judge, not a strong external one"
    assert mt["pairwise"]["baseline"] == "lm" and mt["pairwise"]["results"]["overall"]["ties"] == 2
    assert set(mt["questions"]) == set(mt["answers"]) and len(mt["answers"]) == 1
    rubric = json.loads((out / "rubric.json").read_text())
    assert [m["role"] for m in rubric["models"]] == ["model", "baseline"]
    assert rubric["weights"]["safety"] == 2.0 and "equal by default" in rubric["weights_note"]
    model = rubric["models"][0]
    garbled = sum(j["verdicts"] is None for j in model["judgments"])
    assert model["n_items"] == 3 and model["n_errors"] == garbled
    assert row["rubric/conciseness"] == 0.0 and row["rubric/clarity"] == pytest.approx((3 - garbled) / 3)
    assert row["rubric_score"] == pytest.approx((3 - garbled) / 3 * 8 / 9)
    assert model["pass_rate"] == rubric["models"][1]["pass_rate"]  # same greedy model on both sides
    for png in ("mt_bench_by_category.png", "mt_bench_pairwise.png", "rubric.png"):
        assert (out / png).stat().st_size > 1000, png
    responses = json.loads((out / "responses.json").read_text())
    assert len(responses["prompts"]) == 5 and len(responses["rewards"]) == 5
    assert row["reward_mean"] == pytest.approx(sum(responses["rewards"]) / 5)


def test_eval_cli_refuses_missing_checkpoint(tmp_path):
    from c2f_megatron.eval.cli import main

    assert main(None, [f"out_dir={tmp_path}"]) == 2
    assert main(None, ["responses.num_prompts=0"]) == 2
