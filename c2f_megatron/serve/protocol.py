"""The OpenAI API as ``c2f serve`` speaks it: request validation, errors, and response objects.

Torch-free, so it is tested without a model. Field names and shapes follow the OpenAI reference (and vLLM's
server where the reference leaves a choice open):

- ``POST /v1/chat/completions``: ``messages`` (system / user / assistant, string or text-part content),
  rendered in the model's chat format by the engine;
- ``POST /v1/completions``: ``prompt`` as a string, a list of strings, a list of token ids or a list of those;
- sampling: ``temperature`` (0 is greedy), ``top_p``, ``max_tokens`` (``max_completion_tokens`` for chat),
  ``stop`` (a string or up to 4), ``seed``, ``n``; ``top_k`` as vLLM's extension; ``logprobs``
  (chat: bool plus ``top_logprobs`` 0-20; completions: an int 0-5); ``stream`` with
  ``stream_options.include_usage``; ``return_token_ids`` (vLLM's extension) adds each choice's ids.
- Log-probs are the model's own distribution, before temperature and filters (vLLM's default).
- Anything that would change the output and is not implemented (penalties, ``logit_bias``, tools,
  ``response_format``, ``echo``, ``best_of``, ``suffix``) is refused with a 400 naming the field, never
  silently ignored; unknown fields are ignored, as OpenAI's own server does for new client fields.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_STOP = 4
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
MAX_N = 16


class APIError(Exception):
    """An error the client sees as OpenAI's ``{"error": {...}}`` body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class SamplingParams:
    """How every choice of one request is sampled. ``top_logprobs`` None: no log-probs."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    top_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one generation batch (one sampler configuration)."""
        if self.greedy:
            return (True,)
        return (False, self.temperature, self.top_p, self.top_k)


@dataclass
class Request:
    """One validated request. ``messages`` (chat) or ``prompts`` (completions: text or ids per prompt)."""

    kind: Literal["chat", "completion"]
    model: str
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    messages: list[tuple[str, str]] = field(default_factory=list)  # (role, text), system included
    prompts: list[str | list[int]] = field(default_factory=list)


_UNSUPPORTED = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repetition_penalty": 1,
    "logit_bias": None,
    "tools": None,
    "functions": None,
    "tool_choice": None,
    "function_call": None,
    "response_format": None,
    "echo": False,
    "suffix": None,
    "best_of": None,
}


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{name}' must be a number, got {json.dumps(value)}", name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be in [{low}, {high}], got {value}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, low: int, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {json.dumps(value)}", name)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise bad_request(f"'{name}' must be {bound}, got {value}", name)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise bad_request(f"'stop' takes at most {MAX_STOP} sequences, got {len(stop)}", "stop")
    return tuple(s for s in stop if s)


def _sampling(body: dict[str, Any], kind: str) -> SamplingParams:
    for name, neutral in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != neutral and value != [] and value != {}:
            raise bad_request(f"'{name}' is not supported by this server", name)
    max_tokens = _integer(body, "max_tokens", None, 1)
    if kind == "chat":
        max_tokens = _integer(body, "max_completion_tokens", max_tokens, 1)
        wants = body.get("logprobs")
        if wants is not None and not isinstance(wants, bool):
            raise bad_request("'logprobs' must be a boolean for chat completions", "logprobs")
        top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS_CHAT)
        if top is not None and not wants:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top_logprobs = (top or 0) if wants else None
    else:
        top_logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS_COMPLETION)
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        top_k=max(0, _integer(body, "top_k", 0, -1) or 0),
        max_tokens=max_tokens,
        stop=_stop(body),
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
        n=_integer(body, "n", 1, 1, MAX_N),
        top_logprobs=top_logprobs,
    )


def _content(message: dict[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad_request(f"{where}.content: only text parts are supported", f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _messages(body: dict[str, Any]) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", where)
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad_request(
                f"{where}.role must be system, user or assistant, got {role!r}", f"{where}.role"
            )
        if role == "system" and i != 0:
            raise bad_request(f"{where}: a system message may only come first", f"{where}.role")
        out.append((role, _content(m, where)))
    if out[-1][0] == "assistant":
        raise bad_request("the last message must come from the user", f"messages[{len(out) - 1}].role")
    return out


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _prompts(body: dict[str, Any]) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if _is_ids(prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        return [p if isinstance(p, str) else list(p) for p in prompt]
    raise bad_request(
        "'prompt' must be a string, a list of strings, a list of token ids, or a list of such lists", "prompt"
    )


def parse_request(kind: Literal["chat", "completion"], raw: bytes) -> Request:
    """A validated ``Request`` from a request body, or an ``APIError`` (400) naming the field."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required", "model")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    request = Request(
        kind=kind,
        model=model,
        sampling=_sampling(body, kind),
        stream=stream,
        include_usage=bool(options.get("include_usage")) and stream,
        return_token_ids=bool(body.get("return_token_ids")),
    )
    if kind == "chat":
        request.messages = _messages(body)
    else:
        request.prompts = _prompts(body)
        if len(request.prompts) * request.sampling.n > MAX_N:
            raise bad_request(
                f"{len(request.prompts)} prompts x n={request.sampling.n} choices exceeds {MAX_N}", "n"
            )
    return request


# ----------------------------------------------------------------------------------------------- responses


@dataclass
class TokenInfo:
    """One generated token as the response reports it: its text piece and, when asked, log-probs."""

    id: int
    text: str
    logprob: float | None = None
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    tokens: list[TokenInfo]  # reported (log-probs, token ids): those inside ``text``, then EOS
    completion_tokens: int  # every generated id, a stop string's and EOS included


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.text,
                "logprob": t.logprob,
                "bytes": _bytes(t.text),
                "top_logprobs": [{"token": s, "logprob": lp, "bytes": _bytes(s)} for s, lp in t.top],
            }
            for t in tokens
        ]
    }


def completion_logprobs(tokens: list[TokenInfo], start: int = 0) -> dict[str, Any]:
    offsets, at = [], start
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_body(request: Request, rid: str, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
    """The non-streaming response."""
    wants_logprobs = request.sampling.top_logprobs is not None
    out = []
    for c in choices:
        if request.kind == "chat":
            item: dict[str, Any] = {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c.tokens) if wants_logprobs else None,
                "finish_reason": c.finish_reason,
            }
        else:
            item = {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs(c.tokens) if wants_logprobs else None,
                "finish_reason": c.finish_reason,
            }
        if request.return_token_ids:
            item["token_ids"] = [t.id for t in c.tokens]
        out.append(item)
    return {
        "id": rid,
        "object": "chat.completion" if request.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": out,
        "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
    }


def chunk_body(
    request: Request,
    rid: str,
    index: int,
    text: str | None,
    tokens: list[TokenInfo],
    finish_reason: str | None,
    first: bool = False,
) -> dict[str, Any]:
    """One server-sent event of a stream: a text delta of choice ``index`` (and its tokens' log-probs)."""
    wants_logprobs = request.sampling.top_logprobs is not None and tokens
    if request.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {}
        if text and not first:
            delta["content"] = text
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": chat_logprobs(tokens) if wants_logprobs else None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {
            "index": index,
            "text": text or "",
            "logprobs": completion_logprobs(tokens) if wants_logprobs else None,
            "finish_reason": finish_reason,
        }
    if request.return_token_ids:
        choice["token_ids"] = [t.id for t in tokens]
    return {
        "id": rid,
        "object": "chat.completion.chunk" if request.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [choice],
    }


def usage_chunk(request: Request, rid: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if request.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def models_body(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_body(name, created)]}


def model_body(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "c2f-megatron"}
