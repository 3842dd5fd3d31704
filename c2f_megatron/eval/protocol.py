"""The two calls a scorer needs from a model, and a scripted double for tests.

Benchmarks only need "how likely is this continuation" (multiple choice) and "what does greedy decoding say"
(exact match); keeping that interface this small lets the scorers be verified without any real model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class LanguageModel(Protocol):
    """A model as the scorers see it."""

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        """Sum of log p(continuation | context) over the continuation's tokens, one value per request."""
        ...

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        """Greedy continuation of each prompt, cut before the first stop string (which is not included)."""
        ...


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """Cut ``text`` before the earliest occurrence of any stop string, as a generation backend must."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class ScriptedModel:
    """A ``LanguageModel`` whose answers come from plain functions; used to test scorers exactly.

    ``score(context, continuation)`` gives the log-likelihood, ``respond(prompt)`` the generation (stop strings
    are applied here, as a real backend would). Calls are counted so tests can check batching/limits.
    """

    def __init__(
        self,
        score: Callable[[str, str], float] | None = None,
        respond: Callable[[str], str] | None = None,
    ) -> None:
        self._score = score
        self._respond = respond
        self.loglikelihood_calls = 0
        self.generate_calls = 0

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        if self._score is None:
            raise RuntimeError("ScriptedModel: no score function given, cannot answer loglikelihood requests")
        self.loglikelihood_calls += 1
        return [float(self._score(ctx, cont)) for ctx, cont in requests]

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        if self._respond is None:
            raise RuntimeError("ScriptedModel: no respond function given, cannot answer generate requests")
        self.generate_calls += 1
        return [truncate_at_stop(self._respond(p), stop) for p in prompts]
