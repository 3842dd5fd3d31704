"""An OpenAI-compatible chat client for judges, on the standard library: retries and clear refusals.

Any endpoint that speaks ``POST /v1/chat/completions`` works (OpenAI, vLLM, SGLang, a local server).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


class JudgeAPIError(RuntimeError):
    """The judge endpoint could not be used (bad key, bad URL, repeated server errors)."""


@dataclass
class JudgeClientConfig:
    """Where and how to call the judge. The key comes from ``api_key`` or the ``api_key_env`` variable; with
    neither, no Authorization header is sent (local servers)."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4"
    api_key: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 2048
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 2.0


class OpenAIChatClient:
    """POST {base_url}/chat/completions with retries (429, 5xx, network errors) and exponential backoff."""

    def __init__(self, config: JudgeClientConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self._sleep = sleep

    def _api_key(self) -> str | None:
        return self.config.api_key or os.environ.get(self.config.api_key_env) or None

    def complete(self, messages: list[dict[str, str]]) -> str:
        cfg = self.config
        url = cfg.base_url.rstrip("/") + "/chat/completions"
        body = {
            "model": cfg.model,
            "messages": messages,
            "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last_error = ""
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                self._sleep(cfg.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(
                url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
            )
            try:
                with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:500]
                if e.code in (401, 403):
                    raise JudgeAPIError(
                        f"judge endpoint {url} refused the request (HTTP {e.code}): check the API key "
                        f"(config api_key or ${cfg.api_key_env}; key {'set' if key else 'not set'}). {detail}"
                    ) from e
                if e.code != 429 and e.code < 500:
                    raise JudgeAPIError(
                        f"judge endpoint {url}: HTTP {e.code} for model {cfg.model!r}: {detail}"
                    ) from e
                last_error = f"HTTP {e.code}: {detail}"
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last_error = f"{type(e).__name__}: {e}"
                continue
            except json.JSONDecodeError as e:
                last_error = f"response is not JSON ({e})"
                continue
            try:
                return payload["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError) as e:
                raise JudgeAPIError(
                    f"judge endpoint {url}: no choices[0].message.content in {str(payload)[:300]}"
                ) from e
        raise JudgeAPIError(
            f"judge endpoint {url}: failed after {cfg.max_retries + 1} attempts; last error: {last_error}"
        )


def map_concurrent(fn: Callable[[Any], Any], items: Sequence[Any], max_workers: int) -> list[Any]:
    """``[fn(x) for x in items]`` with up to ``max_workers`` judge requests in flight, order kept."""
    if max_workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(fn, items))
