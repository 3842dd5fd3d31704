"""The HTTP side of ``c2f serve``: OpenAI routes, dynamic batching of concurrent requests, streaming.

Threads (rank 0): ``ThreadingHTTPServer`` runs one thread per connection; each validates its request, turns
it into rows (one per choice), queues a ``Job`` and waits on the job's event queue. The main thread runs
``Server.run``: it takes the oldest job, waits ``batch_wait_s`` for company, adds every queued job with the
same sampler configuration that fits (at most ``max_batch_size`` rows, prompt block + longest limit within
the model's positions), runs the batch (``engine.run_batch``) and routes each token to its job. Jobs that
did not fit wait for the next batch, oldest first, so none starves.

Text: token pieces come from an incremental detokenizer (the text a token adds after its predecessors);
a streamed choice holds back the few characters that could begin a stop string, and the final text is the
decoded response cut before its first stop string, as ``eval.lm.TokenLM.generate`` cuts it.

Shutdown: SIGTERM (or SIGINT) stops the main loop after the running batch; queued requests and any that
arrive later get a 503, the other ranks are released, and the process exits 0.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import hmac
import json
import queue
import random
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from c2f_megatron.eval.protocol import truncate_at_stop
from c2f_megatron.serve import protocol as api
from c2f_megatron.serve.engine import HEARTBEAT_S, NOOP, BatchSpec, RowResult, RowSpec, TokenEvent

MAX_BODY_BYTES = 16 << 20


class IncrementalDecoder:
    """Text pieces of a growing id sequence: each new id's piece is the decoded text of (previous id, id)
    minus that of the previous id, so a sentencepiece word boundary keeps its space; a piece that ends in
    an incomplete UTF-8 character waits for the next id."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] is the context the next piece is decoded after
        self.read = 0

    def piece(self, ids: list[int]) -> str:
        context = self.tokenizer.decode(self.ids[self.prefix : self.read])
        return self.tokenizer.decode(self.ids[self.prefix : self.read] + ids)[len(context) :]

    def add(self, token: int) -> str:
        self.ids.append(token)
        context = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if text.endswith("\ufffd") or not text.startswith(context):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(context) :]


@dataclass
class Job:
    """One request's rows and where their events go: ``(row, TokenEvent | RowResult | APIError)``."""

    request: api.Request
    rows: list[RowSpec]
    events: queue.Queue = field(default_factory=queue.Queue)
    connection: socket.socket | None = None  # the client's, to drop the job if it hangs up while queued

    @property
    def key(self) -> tuple[Any, ...]:
        return self.request.sampling.batch_key()

    @property
    def prompt_tokens(self) -> int:
        """Usage's prompt tokens: each prompt once, however many choices (``n``) it has, as OpenAI counts."""
        return sum(len(r.prompt) for r in self.rows[:: self.request.sampling.n])

    def client_left(self) -> bool:
        """The client closed its connection (a timeout gave up on it): no one waits for the answer."""
        if self.connection is None:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # open, nothing sent: still waiting
        except OSError:
            return True

    def fail(self, error: api.APIError) -> None:
        for i in range(len(self.rows)):
            self.events.put((i, error))


class Server:
    """Rank 0's scheduler and HTTP front of one model (``lm``: an ``eval.megatron_model.MegatronLM``)."""

    def __init__(
        self,
        lm: Any,
        chat: Any,
        model_name: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        max_batch_size: int = 16,
        batch_wait_s: float = 0.02,
        default_max_tokens: int = 512,
        log: bool = True,
    ):
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.chat = chat
        self.model_name = model_name
        self.api_key = api_key
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.default_max_tokens = default_max_tokens
        self.max_length = lm.max_length
        self.log = log
        self.created = int(time.time())
        self.stopping = threading.Event()
        self._lock = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._random = random.SystemRandom()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    # ------------------------------------------------------------------------------------ requests -> rows

    def _encode(self, request: api.Request) -> list[list[int]]:
        if request.kind == "chat":
            system = request.messages[0][1] if request.messages[0][0] == "system" else None
            turns = [m for m in request.messages if m[0] != "system"]
            if not turns:
                raise api.bad_request("'messages' needs a user message", "messages")
            return [self.chat.encode_prompt(self.chat.render(turns, system))]
        out = []
        for p in request.prompts:
            if isinstance(p, str):
                if not p:
                    raise api.bad_request("'prompt' must not be empty", "prompt")
                out.append(self.tokenizer.encode(p, add_bos=self.tokenizer.adds_bos))
            else:
                bad = [t for t in p if not 0 <= t < self.tokenizer.vocab_size]
                if bad:
                    raise api.bad_request(
                        f"'prompt' has token ids outside [0, {self.tokenizer.vocab_size}): {bad[:5]}",
                        "prompt",
                    )
                out.append(list(p))
        return out

    def job(self, request: api.Request) -> Job:
        """The rows of a validated request, or a 400 when its prompt and limit do not fit the context."""
        if request.model != self.model_name:
            raise api.APIError(
                404, f"The model `{request.model}` does not exist", param="model", code="model_not_found"
            )
        s = request.sampling
        stops = tuple(dict.fromkeys([*s.stop, *(self.chat.stop_strings if request.kind == "chat" else [])]))
        rows = []
        for prompt in self._encode(request):
            n = len(prompt)
            room = self.max_length - n
            if s.max_tokens is not None and s.max_tokens > room or room < 1:
                asked = s.max_tokens or 1
                raise api.bad_request(
                    f"This model's maximum context length is {self.max_length} tokens. However, you requested "
                    f"{n + asked} tokens ({n} in the {'messages' if request.kind == 'chat' else 'prompt'}, "
                    f"{asked} in the completion). Please reduce the length of the prompt or completion.",
                    "messages" if request.kind == "chat" else "prompt",
                    "context_length_exceeded",
                )
            limit = s.max_tokens or min(self.default_max_tokens, room)
            for j in range(s.n):
                seed = (s.seed + j) % 2**63 if s.seed is not None else self._random.getrandbits(63)
                rows.append(RowSpec(prompt, limit, stops, seed))
        return Job(request, rows)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.stopping.is_set():
                raise api.APIError(
                    503, "the server is shutting down", type="server_error", code="unavailable"
                )
            self._queue.append(job)
            self._lock.notify()

    # ------------------------------------------------------------------------------------ batching

    def _fits(self, jobs: list[Job], job: Job) -> bool:
        rows = [r for j in (*jobs, job) for r in j.rows]
        if len(rows) > self.max_batch_size:
            return False
        return max(len(r.prompt) for r in rows) + max(r.max_tokens for r in rows) <= self.max_length

    def next_batch(self, timeout: float) -> list[Job]:
        """The oldest job and every queued job that can share its batch; [] after ``timeout`` idle."""
        with self._lock:
            if not self._queue and not self._lock.wait_for(
                lambda: self._queue or self.stopping.is_set(), timeout
            ):
                return []
            if not self._queue:
                return []
        with self._lock:
            queued = sum(len(j.rows) for j in self._queue)
        if self.batch_wait_s > 0 and queued < self.max_batch_size:
            time.sleep(self.batch_wait_s)  # let concurrent clients' requests arrive
        with self._lock:
            left = [j for j in self._queue if j.client_left()]
            self._queue = collections.deque(j for j in self._queue if j not in left)
            batch: list[Job] = []
            kept: collections.deque[Job] = collections.deque()
            while self._queue:
                job = self._queue.popleft()
                fits = not batch or (job.key == batch[0].key and self._fits(batch, job))
                (batch if fits else kept).append(job)
            self._queue = kept
        for job in left:
            job.fail(api.APIError(499, "the client closed the connection", code="client_closed"))
        if left and self.log:
            print(f"c2f serve: dropped {len(left)} queued request(s) whose client left", file=sys.stderr)
        return batch

    def _spec(self, batch: list[Job]) -> BatchSpec:
        s = batch[0].request.sampling
        tops = [j.request.sampling.top_logprobs for j in batch if j.request.sampling.top_logprobs is not None]
        return BatchSpec(
            rows=[r for j in batch for r in j.rows],
            greedy=s.greedy,
            temperature=s.temperature if not s.greedy else 1.0,
            top_p=s.top_p,
            top_k=s.top_k,
            top_logprobs=max(tops) if tops else None,
        )

    def run_once(self, batch: list[Job], broadcast: Any) -> None:
        from c2f_megatron.serve.engine import run_batch

        spec = self._spec(batch)
        owners = [(job, i) for job in batch for i in range(len(job.rows))]

        def emit(row: int, event: TokenEvent | RowResult) -> None:
            job, i = owners[row]
            job.events.put((i, event))

        broadcast(spec)
        started = time.perf_counter()
        try:
            results = run_batch(self.lm, spec, emit)
        except Exception as exc:  # one bad batch must not take the server down
            traceback.print_exc(file=sys.stderr)
            for job in batch:
                job.fail(api.APIError(500, f"generation failed: {exc}", type="server_error"))
            return
        if self.log:
            tokens = sum(len(r.ids) for r in results)
            seconds = time.perf_counter() - started
            print(
                f"c2f serve: batch of {len(spec.rows)} rows ({len(batch)} requests), {tokens} tokens in "
                f"{seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s)",
                file=sys.stderr,
                flush=True,
            )

    def run(self, broadcast: Any = lambda spec: spec) -> None:
        """Serve until ``stopping`` is set: HTTP in a thread, batches here; then refuse what is queued."""
        thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        thread.start()
        idle_since = time.monotonic()
        try:
            while not self.stopping.is_set():
                batch = self.next_batch(timeout=1.0)
                if batch:
                    self.run_once(batch, broadcast)
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > HEARTBEAT_S:
                    broadcast(NOOP)
                    idle_since = time.monotonic()
        finally:
            self.stopping.set()
            with self._lock:
                queued, self._queue = list(self._queue), collections.deque()
            for job in queued:
                job.fail(
                    api.APIError(503, "the server is shutting down", type="server_error", code="unavailable")
                )
            self.httpd.shutdown()
            self.httpd.server_close()

    def stop(self, *_: Any) -> None:
        """Signal handler: finish the running batch, then shut down."""
        self.stopping.set()
        with self._lock:
            self._lock.notify_all()


# ---------------------------------------------------------------------------------------------- choices


class ChoiceText:
    """One choice's text as its tokens arrive: pieces and log-probs, what a stream may send, the end.

    The streamed text is the pieces joined, cut before the first stop string; ``final`` (non-streaming) is
    the whole response decoded at once and cut the same way, as ``eval.lm.TokenLM.generate`` does."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], want_logprobs: bool):
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = list(stop)
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.want_logprobs = want_logprobs
        self.tokens: list[api.TokenInfo] = []
        self.ends: list[int] = []  # where each token's piece ends in ``text``
        self.eos: api.TokenInfo | None = None
        self.text = ""
        self.sent = 0  # characters streamed
        self.tokens_sent = 0

    def add(self, event: TokenEvent) -> None:
        top: list[tuple[str, float]] = []
        if self.want_logprobs and event.top:
            top = [(self.decoder.piece([t]), lp) for t, lp in event.top]
        if event.id == self.tokenizer.eos_id:
            self.eos = api.TokenInfo(event.id, "", event.logprob, top)
            return
        piece = self.decoder.add(event.id)
        self.text += piece
        self.tokens.append(api.TokenInfo(event.id, piece, event.logprob, top))
        self.ends.append(len(self.text))

    def _tokens_upto(self, chars: int) -> int:
        """How many tokens lie within the first ``chars`` characters (a stop string's tokens do not)."""
        return bisect.bisect_right(self.ends, chars)

    def reported(self, text: str) -> list[api.TokenInfo]:
        """The tokens a response reports for ``text``: those inside it, then EOS if the row sampled it."""
        n = len(self.tokens) if text == self.text else self._tokens_upto(len(text))
        return self.tokens[:n] + ([self.eos] if self.eos is not None and n == len(self.tokens) else [])

    def final(self, result: RowResult) -> str:
        ids = [t for t in result.ids if t != self.tokenizer.eos_id]
        return truncate_at_stop(self.tokenizer.decode(ids), self.stop)

    def delta(self) -> tuple[str, list[api.TokenInfo]]:
        """Text (and its tokens) a stream may send now: none that could turn out to start a stop string."""
        safe = len(truncate_at_stop(self.text, self.stop))
        if self.stop:
            safe = min(safe, len(self.text) - self.hold)
        if safe <= self.sent:
            return "", []
        n = self._tokens_upto(safe)
        out, tokens = self.text[self.sent : safe], self.tokens[self.tokens_sent : n]
        self.sent, self.tokens_sent = safe, n
        return out, tokens

    def rest(self) -> tuple[str, list[api.TokenInfo]]:
        """What a stream sends when the row ends: the text up to its stop string and the tokens not sent."""
        text = truncate_at_stop(self.text, self.stop)
        out = text[self.sent :]
        tokens = self.reported(text)[self.tokens_sent :]
        self.sent, self.tokens_sent = len(text), len(self.tokens)
        return out, tokens


def collect(server: Server, job: Job) -> dict[str, Any]:
    """Wait for every row of ``job`` and build the non-streaming response (choice i is row i: prompts in
    order, ``n`` choices each, OpenAI's order)."""
    want = job.request.sampling.top_logprobs is not None
    texts = [ChoiceText(server.tokenizer, r.stop, want) for r in job.rows]
    finished: dict[int, api.Choice] = {}
    while len(finished) < len(job.rows):
        row, event = job.events.get()
        if isinstance(event, api.APIError):
            raise event
        if isinstance(event, TokenEvent):
            texts[row].add(event)
            continue
        text = texts[row].final(event)
        finished[row] = api.Choice(row, text, event.finish_reason, texts[row].reported(text), len(event.ids))
    choices = [finished[i] for i in range(len(job.rows))]
    return api.response_body(job.request, api.new_id(job.request.kind), choices, job.prompt_tokens)


def stream(server: Server, job: Job, write: Any) -> None:
    """Send ``job``'s choices as server-sent events while they are generated; ``write(bytes)``."""
    request, rid = job.request, api.new_id(job.request.kind)
    want = request.sampling.top_logprobs is not None
    texts = [ChoiceText(server.tokenizer, r.stop, want) for r in job.rows]

    def send(doc: dict[str, Any]) -> None:
        write(b"data: " + json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n\n")

    if request.kind == "chat":
        for i in range(len(job.rows)):
            send(api.chunk_body(request, rid, i, "", [], None, first=True))
    done, completion_tokens = 0, 0
    while done < len(job.rows):
        row, event = job.events.get()
        if isinstance(event, api.APIError):
            send(event.body())
            break
        if isinstance(event, TokenEvent):
            texts[row].add(event)
            text, tokens = texts[row].delta()
            if text:
                send(api.chunk_body(request, rid, row, text, tokens, None))
            continue
        text, tokens = texts[row].rest()
        completion_tokens += len(event.ids)
        send(api.chunk_body(request, rid, row, text, tokens, event.finish_reason))
        done += 1
    if request.include_usage:
        send(api.usage_chunk(request, rid, job.prompt_tokens, completion_tokens))
    write(b"data: [DONE]\n\n")


# ---------------------------------------------------------------------------------------------- HTTP


@contextlib.contextmanager
def _client_may_leave():
    """A client that hangs up early loses its answer; its rows finish with their batch and are dropped."""
    try:
        yield
    except (BrokenPipeError, ConnectionResetError):
        pass


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "c2f-serve"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
            pass

        def _send_json(self, status: int, doc: dict[str, Any]) -> None:
            payload = json.dumps(doc, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _error(self, error: api.APIError) -> None:
            self._send_json(error.status, error.body())

        def _authorized(self) -> bool:
            if not server.api_key:
                return True
            given = self.headers.get("Authorization", "")
            token = given[7:] if given.startswith("Bearer ") else ""
            if hmac.compare_digest(token.encode(), server.api_key.encode()):
                return True
            self._error(api.APIError(401, "Incorrect API key provided", code="invalid_api_key"))
            return False

        def _get(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/health":
                self._send_json(200, {"status": "ok"})
                return
            if not self._authorized():
                return
            if path == "/v1/models":
                self._send_json(200, api.models_body(server.model_name, server.created))
            elif path == f"/v1/models/{server.model_name}":
                self._send_json(200, api.model_body(server.model_name, server.created))
            elif path.startswith("/v1/models/"):
                name = path[len("/v1/models/") :]
                self._error(api.APIError(404, f"The model `{name}` does not exist", code="model_not_found"))
            elif path in ("/v1/chat/completions", "/v1/completions"):
                self._error(api.APIError(405, f"{path} takes POST", code="method_not_allowed"))
            else:
                self._error(api.APIError(404, f"no route {path}", code="not_found"))

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            with _client_may_leave():
                self._get()

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            with _client_may_leave():
                self._post()

        def _post(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            kind = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}.get(path)
            try:
                length = int(self.headers.get("Content-Length") or -1)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY_BYTES:
                self.close_connection = True
                status = 413 if length > MAX_BODY_BYTES else 411
                self._error(
                    api.APIError(status, f"the body needs a Content-Length of at most {MAX_BODY_BYTES}")
                )
                return
            raw = self.rfile.read(length)
            if not self._authorized():
                return
            if kind is None:
                self._error(api.APIError(404, f"no route {path}", code="not_found"))
                return
            try:
                job = server.job(api.parse_request(kind, raw))
                job.connection = self.connection
                server.submit(job)
                if not job.request.stream:
                    self._send_json(200, collect(server, job))
                    return
            except api.APIError as error:
                self._error(error)
                return
            except (BrokenPipeError, ConnectionResetError):
                raise  # the client left: nothing to answer
            except Exception as exc:  # a bug in one request must not stop the server
                traceback.print_exc(file=sys.stderr)
                self._error(api.APIError(500, f"internal error: {exc}", type="server_error"))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def write(data: bytes) -> None:
                self.wfile.write(data)
                self.wfile.flush()

            stream(server, job, write)

    return Handler
