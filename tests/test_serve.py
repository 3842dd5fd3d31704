"""``c2f serve`` through the ``openai`` client: our generation token for token, streaming, concurrency,
errors and SIGTERM, on the tiny preset and on SmolLM2-135M; plus the request parser on its own."""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from c2f_megatron.serve import protocol as api
from c2f_megatron.serve.process import ServerProcess
from tests.launch import run_python, worker_env

KEY = "sk-test-key"
MAX_NEW = 12


# ------------------------------------------------------------------------------------------ parser


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", b"{not json", None),
        ("chat", b"[1, 2]", None),
        ("chat", {"messages": [{"role": "user", "content": "x"}]}, "model"),
        ("chat", {"model": "m", "messages": []}, "messages"),
        ("chat", {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("chat", {"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ("chat", {"model": "m", "messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role"),
        (
            "chat",
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}],
            },
            "messages[1].role",
        ),
        (
            "chat",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            "temperature",
        ),
        (
            "chat",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
        ),
        ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 99}, "n"),
        (
            "chat",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
        ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
        (
            "chat",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": list("abcde")},
            "stop",
        ),
        (
            "chat",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5},
            "presence_penalty",
        ),
        ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
        ("completion", {"model": "m", "prompt": 5}, "prompt"),
        ("completion", {"model": "m", "prompt": []}, "prompt"),
        ("completion", {"model": "m", "prompt": "x", "logprobs": 9}, "logprobs"),
        ("completion", {"model": "m", "prompt": "x", "echo": True}, "echo"),
        ("completion", {"model": "m", "prompt": ["a", "b", "c"], "n": 6}, "n"),
    ],
)
def test_parser_refuses_with_the_field(kind, body, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(api.APIError) as err:
        api.parse_request(kind, raw)
    assert err.value.status == 400
    assert err.value.param == param
    assert err.value.body()["error"]["type"] == "invalid_request_error"


def test_parser_accepts_openai_shapes():
    chat = api.parse_request(
        "chat",
        json.dumps(
            {
                "model": "m",
                "messages": [
                    {"role": "developer", "content": "be brief"},
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "you"}],
                    },
                ],
                "temperature": 0,
                "max_completion_tokens": 7,
                "logprobs": True,
                "top_logprobs": 3,
                "stop": "\n",
                "stream": True,
                "stream_options": {"include_usage": True},
                "presence_penalty": 0,
                "user": "someone",  # unknown fields are ignored
            }
        ).encode(),
    )
    assert chat.messages == [("system", "be brief"), ("user", "hi you")]
    assert chat.sampling.greedy and chat.sampling.max_tokens == 7 and chat.sampling.top_logprobs == 3
    assert chat.sampling.stop == ("\n",) and chat.stream and chat.include_usage
    done = api.parse_request(
        "completion", json.dumps({"model": "m", "prompt": [[1, 2], "x"], "n": 2}).encode()
    )
    assert done.prompts == [[1, 2], "x"] and done.sampling.n == 2 and done.sampling.top_logprobs is None


def test_incremental_pieces_join_to_the_decoded_text(smollm2_hf: Path):
    from c2f_megatron.data import load_tokenizer
    from c2f_megatron.serve.server import IncrementalDecoder

    text = "Hello  world! Ünïcödé — 数学 🙂 tabs\tand\nnew lines, ' quotes ' and 3.14159"
    for tok in (load_tokenizer(), load_tokenizer(str(smollm2_hf))):
        ids = tok.encode(text)
        decoder = IncrementalDecoder(tok)
        assert "".join(decoder.add(t) for t in ids) == tok.decode(ids), tok.name


# ------------------------------------------------------------------------------------------ tiny preset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve_ckpts")
    run_python("eval_make_ckpts.py", [str(out)], timeout=300)
    return out / "lm"


@pytest.fixture(scope="module")
def server(tiny: Path):
    proc = ServerProcess(
        ["--checkpoint", str(tiny), "--model-name", "tiny", "--api-key", KEY, "--batch-wait-ms", "100"],
        env=worker_env(2),
    ).start()
    yield proc
    proc.kill()


def _client(server: ServerProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=120)


# 16 distinct prompts of 3..18 ids (Mistral ids, BOS first)
PROMPTS = [[1] + [100 + 37 * i + 11 * j for j in range(2 + i)] for i in range(16)]


@pytest.fixture(scope="module")
def reference(tiny: Path, tmp_path_factory) -> list[list[int]]:
    """Our own greedy generation (``MegatronLM.generate_ids``, one prompt at a time) of every prompt."""
    path = tmp_path_factory.mktemp("serve_ref") / "requests.json"
    path.write_text(json.dumps({"prompts": PROMPTS, "max_new_tokens": MAX_NEW}))
    out = run_python("serve_reference.py", [str(tiny), "-", str(path)], timeout=300)
    return json.loads(out.split("REFERENCE ", 1)[1])


def test_models_health_and_api_key(server):
    assert [m.id for m in _client(server).models.list()] == ["tiny"]
    assert _client(server).models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.AuthenticationError) as err:
        _client(server, "sk-wrong").models.list()
    assert err.value.code == "invalid_api_key"
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=10) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}


def test_greedy_completions_equal_our_generation(server, reference):
    c = _client(server)
    for prompt, ids in list(zip(PROMPTS, reference))[:4]:
        r = c.completions.create(
            model="tiny",
            prompt=prompt,
            temperature=0,
            max_tokens=MAX_NEW,
            extra_body={"return_token_ids": True},
        )
        choice = r.choices[0]
        assert choice.model_extra["token_ids"] == ids
        assert r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens == len(prompt)
        assert choice.finish_reason == ("stop" if ids[-1] == 2 else "length")


def test_stream_equals_response_with_stop_strings_and_logprobs(server):
    c = _client(server)
    base = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Name a colour."}],
        temperature=0,
        max_tokens=MAX_NEW,
    )
    text = base.choices[0].message.content
    assert len(text) > 6
    stop = text[3:6]  # a stop string that the greedy answer reaches
    kwargs = dict(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        temperature=0,
        max_tokens=MAX_NEW,
        stop=[stop],
        logprobs=True,
        top_logprobs=2,
    )
    whole = c.chat.completions.create(**kwargs)
    parts, finish, tokens, usage = [], None, [], None
    for chunk in c.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if not chunk.choices:
            usage = chunk.usage
            continue
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
        if chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.content
    w = whole.choices[0]
    assert "".join(parts) == w.message.content
    assert finish == w.finish_reason
    assert usage == whole.usage
    assert [t.token for t in tokens] == [t.token for t in w.logprobs.content]
    assert [t.logprob for t in tokens] == [t.logprob for t in w.logprobs.content]
    for t in w.logprobs.content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob <= t.top_logprobs[0].logprob + 1e-9  # greedy: the chosen one is the most likely
    # the system turn changes the prompt; the stop string is cut off wherever it falls
    assert stop not in w.message.content
    # text completions stream the same way
    kw = dict(model="tiny", prompt=PROMPTS[5], temperature=0, max_tokens=MAX_NEW, logprobs=1)
    one = c.completions.create(**kw)
    streamed = list(c.completions.create(**kw, stream=True))
    assert "".join(s.choices[0].text for s in streamed) == one.choices[0].text
    assert sum((s.choices[0].logprobs.tokens for s in streamed if s.choices[0].logprobs), []) == (
        one.choices[0].logprobs.tokens
    )


def test_16_concurrent_clients_get_their_own_answers(server, reference):
    limits = [MAX_NEW - (i % 5) for i in range(len(PROMPTS))]
    results: dict[int, object] = {}

    def ask(i: int) -> None:
        c = _client(server)
        if i % 2:
            results[i] = c.completions.create(
                model="tiny",
                prompt=PROMPTS[i],
                temperature=0,
                max_tokens=limits[i],
                extra_body={"return_token_ids": True},
            ).choices[0]
        else:
            ids, finish = [], None
            for chunk in c.completions.create(
                model="tiny",
                prompt=PROMPTS[i],
                temperature=0,
                max_tokens=limits[i],
                stream=True,
                extra_body={"return_token_ids": True},
            ):
                ids += chunk.choices[0].model_extra["token_ids"]
                finish = chunk.choices[0].finish_reason or finish
            results[i] = (ids, finish)

    before = server.output()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(len(PROMPTS)))
    for i, got in results.items():
        ids = got.model_extra["token_ids"] if i % 2 else got[0]
        want = reference[i][: limits[i]]
        assert ids == want, f"client {i}"
    batches = [line for line in server.output()[len(before) :].splitlines() if "c2f serve: batch of" in line]
    assert any(int(line.split("batch of ")[1].split()[0]) > 1 for line in batches), batches


def test_sampling_is_seeded_per_request(server):
    c = _client(server)
    kw = dict(model="tiny", prompt=PROMPTS[3], temperature=0.9, top_p=0.95, max_tokens=MAX_NEW, seed=7, n=3)
    first = c.completions.create(**kw)
    again = c.completions.create(**kw)
    assert [ch.index for ch in first.choices] == [0, 1, 2]
    assert [ch.text for ch in first.choices] == [ch.text for ch in again.choices]
    assert len({ch.text for ch in first.choices}) > 1  # n choices draw differently
    assert first.usage.prompt_tokens == len(PROMPTS[3])  # the prompt counts once for n choices
    other = c.completions.create(**{**kw, "seed": 8})
    assert [ch.text for ch in other.choices] != [ch.text for ch in first.choices]


def _post(server: ServerProcess, path: str, data: bytes, method: str = "POST") -> tuple[int, dict]:
    req = urllib.request.Request(
        server.url + path,
        data=data if method == "POST" else None,
        method=method,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_errors_are_openai_shaped_and_leave_the_server_up(server):
    c = _client(server)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1000)
    assert err.value.code == "context_length_exceeded" and "256 tokens" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny", prompt=[[1, 5, 99999]])
    assert err.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny", prompt="x", frequency_penalty=1.0)
    assert err.value.param == "frequency_penalty"
    status, body = _post(server, "/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(server, "/embeddings", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = _post(server, "/completions", b"", method="GET")
    assert status == 405
    # still serving
    r = c.completions.create(model="tiny", prompt=PROMPTS[1], temperature=0, max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_a_queued_request_whose_client_left_is_dropped(server):
    """A client that times out while its request waits behind a running batch costs no generation."""
    c = _client(server)
    before = len(server.output())
    stream = c.completions.create(model="tiny", prompt=PROMPTS[4], temperature=0, max_tokens=240, stream=True)
    next(iter(stream))  # the long batch runs
    # shorter than the server's batch wait (100 ms): the request is still queued when its client leaves,
    # however fast the running batch decodes
    impatient = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=0.05)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="tiny", prompt=PROMPTS[6], temperature=0, max_tokens=8)
    list(stream)
    c.completions.create(model="tiny", prompt=PROMPTS[1], temperature=0, max_tokens=1)  # the next batch
    assert "dropped 1 queued request(s) whose client left" in server.output()[before:]


def test_sigterm_finishes_the_running_request_then_exits(server):
    """The last test of the module's server: SIGTERM while a stream runs."""
    c = _client(server)
    stream = c.completions.create(model="tiny", prompt=PROMPTS[2], temperature=0, max_tokens=200, stream=True)
    first = next(iter(stream))
    server.proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert (rest[-1] if rest else first).choices[0].finish_reason in ("stop", "length")
    assert server.proc.wait(60) == 0
    assert "c2f serve: stopped" in server.output()
    with pytest.raises(openai.APIConnectionError):
        c.models.list()


# ------------------------------------------------------------------------------------------ SmolLM2


def test_smollm2_from_hf_dir_chat_equals_our_generation(smollm2_hf: Path, tmp_path: Path):
    """A Hugging Face directory is converted once and served in its ChatML template; greedy chat answers
    equal ``MegatronLM.generate_ids`` on the same rendered prompt, streamed or not, alone or concurrent."""
    from c2f_megatron.data import ChatFormat, load_tokenizer

    tok = load_tokenizer(str(smollm2_hf))
    chat = ChatFormat("chat-template", tok)
    questions = ["What is the capital of France?", "Give me one tip for sleeping well.", "What is 7 times 8?"]
    prompts = [chat.encode_prompt(chat.render([("user", q)])) for q in questions]
    proc = ServerProcess(
        ["--checkpoint", str(smollm2_hf), "--work-dir", str(tmp_path), "--model-name", "smol"],
        env=worker_env(2),
    ).start()
    try:
        c = openai.OpenAI(base_url=proc.url, api_key="none", max_retries=0, timeout=300)
        answers: dict[int, object] = {}

        def ask(i: int) -> None:
            answers[i] = c.chat.completions.create(
                model="smol",
                messages=[{"role": "user", "content": questions[i]}],
                temperature=0,
                max_tokens=24,
                extra_body={"return_token_ids": True},
            ).choices[0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        streamed = "".join(
            ch.choices[0].delta.content or ""
            for ch in c.chat.completions.create(
                model="smol",
                messages=[{"role": "user", "content": questions[0]}],
                temperature=0,
                max_tokens=24,
                stream=True,
            )
        )
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps({"prompts": prompts, "max_new_tokens": 24}))
    ref = json.loads(
        run_python(
            "serve_reference.py", [str(tmp_path / "converted" / "hf"), str(smollm2_hf), str(requests)]
        ).split("REFERENCE ", 1)[1]
    )
    for i, ids in enumerate(ref):
        assert answers[i].model_extra["token_ids"] == ids, questions[i]
        assert answers[i].message.content == tok.decode([t for t in ids if t != tok.eos_id])
    assert streamed == answers[0].message.content
    assert "Paris" in answers[0].message.content


def test_tensor_parallel_server_equals_our_generation(tiny: Path, reference):
    """Two ranks under torchrun (TP2): rank 0 serves, rank 1 follows its batches; same greedy ids."""
    proc = ServerProcess(
        ["--checkpoint", str(tiny), "--model-name", "tiny", "--tensor-parallel-size", "2"],
        nproc=2,
        env=worker_env(1),
    ).start()
    try:
        c = openai.OpenAI(base_url=proc.url, api_key="none", max_retries=0, timeout=120)
        got = {}

        def ask(i: int) -> None:
            got[i] = (
                c.completions.create(
                    model="tiny",
                    prompt=PROMPTS[i],
                    temperature=0,
                    max_tokens=MAX_NEW,
                    extra_body={"return_token_ids": True},
                )
                .choices[0]
                .model_extra["token_ids"]
            )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [got.get(i) for i in range(4)] == reference[:4]
    finally:
        code = proc.stop(60)
    assert code == 0, proc.output()[-3000:]


def test_bad_arguments_are_one_line(tmp_path: Path):
    from tests.launch import refusal, run_c2f

    assert "not found" in refusal(run_c2f("serve", "--checkpoint", tmp_path / "nothing"), "serve")
    assert "--max-batch-size must be >= 1" in refusal(
        run_c2f("serve", "--checkpoint", tmp_path, "--max-batch-size", "0"), "serve"
    )
    line = refusal(run_c2f("serve", "--checkpoint", tmp_path), "serve")
    assert str(tmp_path) in line and "c2f_checkpoint.json" in line
