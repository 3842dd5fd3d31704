"""MT-Bench judge requests, parsing, scores, and the chat client against a local OpenAI-compatible server."""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from c2f_megatron.eval.judge_client import JudgeAPIError, JudgeClientConfig, OpenAIChatClient
from c2f_megatron.eval.mt_bench import (
    CATEGORIES,
    MTBenchDataError,
    aggregate_pairwise,
    aggregate_single,
    build_single_request,
    combine_games,
    generate_answers,
    judge_name,
    judge_pairwise,
    judge_single,
    load_judge_prompts,
    load_questions,
    load_reference_answers,
    parse_rating,
    parse_verdict,
)

Reply = Callable[[dict], tuple[int, str]]


class JudgeServer:
    """Records every POST; answers with ``reply(body) -> (status, judgment text or error body)``."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[tuple[str, dict, dict]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, dict(self.headers), body))
                status, text = server.reply(body)
                payload = (
                    {"choices": [{"message": {"role": "assistant", "content": text}}]}
                    if status == 200
                    else {"error": text}
                )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture
def serve() -> Iterator[Callable[[Reply], JudgeServer]]:
    started: list[JudgeServer] = []

    def start(reply: Reply) -> JudgeServer:
        s = JudgeServer(reply)
        s.thread.start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.httpd.shutdown()
        s.httpd.server_close()


@pytest.fixture(scope="module")
def mt(shared_data: Path):
    root = shared_data / "mt_bench"
    return (
        load_questions(root / "question.jsonl"),
        load_judge_prompts(root / "judge_prompts.jsonl"),
        load_reference_answers(root / "reference_answer" / "gpt-4.jsonl"),
    )


def _client(url: str, **kw) -> OpenAIChatClient:
    return OpenAIChatClient(
        JudgeClientConfig(base_url=url, model="judge-x", backoff_s=0.0, timeout_s=10, **kw)
    )


def _answers(questions, tag: str) -> dict[int, tuple[str, str]]:
    return {
        q.question_id: (f"<{tag} turn1 q{q.question_id}>", f"<{tag} turn2 q{q.question_id}>")
        for q in questions
    }


def _qid(user_prompt: str, tag: str) -> int:
    return int(user_prompt.split(f"<{tag} turn1 q", 1)[1].split(">", 1)[0])


def test_data_loads_and_judge_names(mt):
    questions, prompts, refs = mt
    assert len(questions) == 80 and {q.category for q in questions} == set(CATEGORIES)
    assert set(prompts) == {
        "single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn",
        "pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn",
    }  # fmt: skip
    assert len(refs) == 30
    assert judge_name("single", "writing", 1) == "single-v1"
    assert judge_name("single", "coding", 2) == "single-math-v1-multi-turn"
    assert judge_name("pairwise", "reasoning", 1) == "pair-math-v1"
    assert judge_name("pairwise", "stem", 2) == "pair-v2-multi-turn"


def test_single_judging_payloads_scores_and_categories(mt, serve, monkeypatch):
    questions, prompts, refs = mt
    rng = random.Random(0)
    table = {(q.question_id, t): rng.randint(1, 10) for q in questions for t in (1, 2)}

    def reply(body: dict) -> tuple[int, str]:
        user = body["messages"][1]["content"]
        turn = 2 if "### User:" in user else 1
        return 200, f"The answer is fine. Rating: [[{table[(_qid(user, 'M'), turn)]}]]"

    server = serve(reply)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    answers = _answers(questions, "M")
    judgments = judge_single(questions, answers, _client(server.url), prompts, refs, max_workers=4)
    assert len(judgments) == 160 and len(server.requests) == 160

    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer test-key"
    assert body["model"] == "judge-x" and body["temperature"] == 0.0 and body["max_tokens"] == 2048

    by_prompt = {
        (_qid(b["messages"][1]["content"], "M"), "### User:" in b["messages"][1]["content"]): b
        for _, _, b in server.requests
    }
    q_math = next(q for q in questions if q.category == "math")
    q_write = next(q for q in questions if q.category == "writing")
    math1, math2 = by_prompt[(q_math.question_id, False)], by_prompt[(q_math.question_id, True)]
    write1 = by_prompt[(q_write.question_id, False)]
    assert math1["messages"][0] == {"role": "system", "content": prompts["single-math-v1"].system_prompt}
    assert math1["messages"][1]["content"] == prompts["single-math-v1"].prompt_template.format(
        question=q_math.turns[0],
        ref_answer_1=refs[q_math.question_id][0],
        answer=answers[q_math.question_id][0],
    )
    assert refs[q_math.question_id][1] in math2["messages"][1]["content"]  # ref_answer_2 for turn 2
    assert math2["messages"][0]["content"] == prompts["single-math-v1-multi-turn"].system_prompt
    assert "[The Start of Reference Answer]" not in write1["messages"][1]["content"]
    assert write1["messages"][1]["content"].startswith(
        prompts["single-v1"].prompt_template.split("{question}")[0]
    )

    scores = aggregate_single(judgments)
    assert scores.n_errors == 0 and list(scores.per_category) == list(CATEGORIES)
    for cat in CATEGORIES:
        ids = [q.question_id for q in questions if q.category == cat]
        expected = [table[(i, t)] for i in ids for t in (1, 2)]
        assert scores.per_category[cat] == pytest.approx(sum(expected) / len(expected))
        assert scores.per_category_turn[(cat, 2)] == pytest.approx(sum(table[(i, 2)] for i in ids) / len(ids))
    assert scores.per_turn[1] == pytest.approx(sum(v for (_, t), v in table.items() if t == 1) / 80)
    assert scores.overall == pytest.approx(sum(table.values()) / 160)


def test_rating_and_verdict_parsing():
    assert parse_rating("Rating: [[8.5]]") == 8.5
    assert parse_rating("I give it [6] out of 10") == 6.0  # FastChat's backup pattern
    assert parse_rating("Rating: [[3]] ... later [[9]]") == 3.0
    assert parse_rating("no rating here") is None
    assert [parse_verdict(t) for t in ("[[A]]", "so [[B]].", "[[C]]", "A is better")] == [
        "A",
        "B",
        "tie",
        "error",
    ]
    assert combine_games("A", "B") == "model_a" and combine_games("B", "A") == "model_b"
    assert combine_games("A", "A") == "tie" and combine_games("tie", "tie") == "tie"  # position bias -> tie
    assert combine_games("A", "error") == "error"


def test_missing_rating_counts_as_error(mt, serve):
    questions, prompts, refs = mt
    server = serve(lambda body: (200, "I refuse to rate."))
    js = judge_single(
        questions[:2], _answers(questions[:2], "M"), _client(server.url), prompts, refs, turns=(1,)
    )
    assert [j.score for j in js] == [None, None]
    assert aggregate_single(js).n_errors == 2


def test_pairwise_both_orders_and_win_rate(mt, serve):
    questions, prompts, refs = mt
    subset = [q for q in questions if q.category in ("math", "writing")]

    def reply(body: dict) -> tuple[int, str]:
        user = body["messages"][1]["content"]
        a_first = user.index("<A turn1") < user.index("<B turn1")
        qid = _qid(user, "A")
        if qid % 3 == 0:  # always says the first assistant: inconsistent across orders -> tie
            return 200, "[[A]]"
        if qid % 3 == 1:  # model A really is better
            return 200, "[[A]]" if a_first else "[[B]]"
        return 200, "[[C]]"

    server = serve(reply)
    js = judge_pairwise(
        subset, _answers(subset, "A"), _answers(subset, "B"), _client(server.url), prompts, refs
    )
    assert len(js) == 2 * len(subset) and len(server.requests) == 4 * len(subset)
    wins = sum(2 for q in subset if q.question_id % 3 == 1)
    summary = aggregate_pairwise(js)
    assert (summary.wins, summary.losses, summary.ties, summary.errors) == (
        wins,
        0,
        2 * len(subset) - wins,
        0,
    )
    assert summary.win_rate_adjusted == pytest.approx(
        (wins + 0.5 * (2 * len(subset) - wins)) / (2 * len(subset))
    )

    q_math = next(q for q in subset if q.category == "math")
    math_bodies = [
        b for _, _, b in server.requests if f"<A turn1 q{q_math.question_id}>" in b["messages"][1]["content"]
    ]
    assert len(math_bodies) == 4
    assert all(refs[q_math.question_id][0] in b["messages"][1]["content"] for b in math_bodies)
    assert {b["messages"][0]["content"] for b in math_bodies} == {
        prompts["pair-math-v1"].system_prompt,
        prompts["pair-math-v1-multi-turn"].system_prompt,
    }
    assert aggregate_pairwise(js, "writing").wins == sum(
        2 for q in subset if q.category == "writing" and q.question_id % 3 == 1
    )


def test_client_retries_server_errors_with_backoff(serve):
    calls = []

    def reply(body: dict) -> tuple[int, str]:
        calls.append(1)
        return (500, "overloaded") if len(calls) < 3 else (200, "[[7]]")

    server = serve(reply)
    sleeps: list[float] = []
    client = OpenAIChatClient(
        JudgeClientConfig(base_url=server.url, backoff_s=0.01, max_retries=3), sleep=sleeps.append
    )
    assert client.complete([{"role": "user", "content": "hi"}]) == "[[7]]"
    assert len(calls) == 3 and sleeps == [0.01, 0.02]

    calls.clear()
    server.reply = lambda body: (503, "down")
    client = OpenAIChatClient(
        JudgeClientConfig(base_url=server.url, backoff_s=0.0, max_retries=2), sleep=sleeps.append
    )
    with pytest.raises(JudgeAPIError, match="failed after 3 attempts; last error: HTTP 503"):
        client.complete([{"role": "user", "content": "hi"}])


def test_client_401_is_a_clear_error_without_retries(serve, monkeypatch):
    server = serve(lambda body: (401, "invalid api key"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeAPIError, match=r"HTTP 401.*\$OPENAI_API_KEY; key not set"):
        _client(server.url).complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1 and "Authorization" not in server.requests[0][1]


def test_client_unreachable_endpoint_fails_after_retries():
    client = _client("http://127.0.0.1:9/v1", max_retries=1)  # port 9 (discard) is not served
    with pytest.raises(JudgeAPIError, match="failed after 2 attempts"):
        client.complete([{"role": "user", "content": "hi"}])


def test_missing_reference_is_an_error(mt):
    questions, prompts, _ = mt
    q = next(q for q in questions if q.category == "coding")
    with pytest.raises(MTBenchDataError, match=f"question {q.question_id} \\(coding\\) needs a reference"):
        build_single_request(q, ("a", "b"), prompts, {}, 1)


def test_generate_answers_passes_the_conversation(mt):
    questions, _, _ = mt
    seen: list[list[list[dict]]] = []

    def respond(chats: list[list[dict]]) -> list[str]:
        seen.append(chats)
        return [f"reply{len(c)}" for c in chats]

    out = generate_answers(questions[:2], respond)
    q = questions[0]
    assert out[q.question_id] == ("reply1", "reply3") and len(out) == 2
    assert [len(batch) for batch in seen] == [2, 2]  # one call for every turn 1, one for every turn 2
    assert seen[1][0] == [
        {"role": "user", "content": q.turns[0]},
        {"role": "assistant", "content": "reply1"},
        {"role": "user", "content": q.turns[1]},
    ]


class _ScriptedLM:
    """A TokenLM stand-in: each reply spells the prompt's length and last id (so a turn-2 reply depends on
    the first answer), and the calls record how prompts were batched."""

    def __init__(self):
        from c2f_megatron.data import load_tokenizer

        self.tokenizer = load_tokenizer()
        self.calls: list[int] = []

    def generate_ids(self, prompts, max_new_tokens, sampling=None, stop=()):
        self.calls.append(len(prompts))
        out = []
        for ids in prompts:
            text = f" answer {len(ids)} {ids[-1]}\n\nHuman: cut here"
            out.append(self.tokenizer.encode(text)[:max_new_tokens] + [self.tokenizer.eos_id])
        return out

    def decode_response(self, ids):
        return self.tokenizer.decode([t for t in ids if t != self.tokenizer.eos_id])


def test_batched_answers_equal_one_chat_at_a_time(mt):
    from c2f_megatron.data import ChatFormat
    from c2f_megatron.eval.mt_bench import model_responder

    questions = mt[0][:5]
    model = _ScriptedLM()
    respond = model_responder(model, ChatFormat("hh", model.tokenizer), 32)
    batched = generate_answers(questions, respond)
    assert model.calls == [5, 5]

    one_at_a_time = {}  # the old path: one generate call per answer, turn 2 right after turn 1
    for q in questions:
        chat = [{"role": "user", "content": q.turns[0]}]
        (first,) = respond([chat])
        chat += [{"role": "assistant", "content": first}, {"role": "user", "content": q.turns[1]}]
        (second,) = respond([chat])
        one_at_a_time[q.question_id] = (first, second)
    assert batched == one_at_a_time
    assert all(a.startswith("answer") and "Human:" not in a for pair in batched.values() for a in pair)
    assert len({pair[1] for pair in batched.values()}) == 5


def test_answers_round_trip_and_refuse_other_questions(mt, tmp_path):
    from c2f_megatron.eval.mt_bench import answers_to_json, load_answers

    questions = mt[0][:3]
    answers = _answers(questions, "base")
    path = tmp_path / "mt_bench.json"
    path.write_text(json.dumps({"model": "base", **answers_to_json(questions, answers)}))
    assert load_answers(path, questions) == answers
    with pytest.raises(MTBenchDataError, match=f"^{re.escape(str(path))}: field 'questions' differs") as err:
        load_answers(path, mt[0][:4])
    assert "\n" not in str(err.value)
    path.write_text(json.dumps({"model": "base", "answers": {}}))
    with pytest.raises(MTBenchDataError, match="field 'questions'"):
        load_answers(path, questions)


def test_select_questions_per_category_then_limit(shared_data):
    from c2f_megatron.eval.mt_bench import CATEGORIES, load_questions, select_questions

    qs = load_questions(shared_data / "mt_bench" / "question.jsonl")
    one_each = select_questions(qs, per_category=1)
    assert [q.category for q in one_each] == list(CATEGORIES)
    assert [q.question_id for q in one_each] == [
        next(x for x in qs if x.category == c).question_id for c in CATEGORIES
    ]
    assert len(select_questions(qs, per_category=2)) == 16
    assert [q.question_id for q in select_questions(qs, per_category=2, limit=3)] == [81, 82, 91]
    assert select_questions(qs) == qs
