"""Typed configuration of ``c2f eval``: what to evaluate, on which data, and where the table goes.

Sections: ``responses`` (generation on held-out HH-RLHF prompts: reward, length, EOS, redundancy,
distinct-n, perplexity of held-out chosen responses, win rate against ``baseline``), ``benchmarks``
(``eval.benchmarks`` names, off when empty), and the judged evaluations: ``judge`` (one OpenAI-compatible
endpoint; judging is off unless a base URL is configured there or in ``$C2F_JUDGE_BASE_URL``), ``mt_bench``
(single grading, pairwise games against ``baseline``) and ``rubric`` (ICE-GRT's 8 criteria on the held-out
responses).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from c2f_megatron.data.hh_rlhf import HHDataConfig
from c2f_megatron.eval.benchmarks import parse_benchmark_name
from c2f_megatron.eval.judge_client import JudgeClientConfig
from c2f_megatron.eval.rubric import resolve_weights
from c2f_megatron.platform.distributed import ParallelConfig

JUDGE_BASE_URL_ENV = "C2F_JUDGE_BASE_URL"
JUDGE_MODEL_ENV = "C2F_JUDGE_MODEL"


@dataclass
class ResponseEvalConfig:
    """Held-out prompts are the eval part of ``hh`` (the same deterministic split the trainers use, so keep
    ``hh`` equal to theirs); the first ``num_prompts`` unique prompts are answered, the first
    ``num_references`` held-out pairs give the chosen responses whose perplexity is measured."""

    enabled: bool = True
    hh: HHDataConfig = field(default_factory=HHDataConfig)
    num_prompts: int = 64
    num_references: int = 64
    max_prompt_length: int = 256  # tokens; longer prompts keep their end (overlong: truncate) or are left out
    overlong: Literal["truncate", "drop"] = "truncate"
    max_new_tokens: int = 128
    max_reference_length: int = 256  # [BOS] prompt chosen [EOS], prompt cut from the left
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    redundancy_n: int = 3

    def __post_init__(self) -> None:
        for name in ("num_prompts", "num_references", "max_prompt_length", "max_new_tokens", "redundancy_n"):
            if getattr(self, name) < (0 if name == "num_references" else 1):
                raise ValueError(f"responses.{name} must be positive, got {getattr(self, name)}")
        if self.max_reference_length < 2:
            raise ValueError(f"responses.max_reference_length must be >= 2, got {self.max_reference_length}")
        if self.temperature <= 0:
            raise ValueError(
                f"responses.temperature must be > 0 (greedy: true for argmax), got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"responses.top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"responses.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class BenchmarkEvalConfig:
    """``names``: ``eval.benchmarks.BENCHMARKS`` entries (``"bbh:navigate"`` style subsets allowed)."""

    names: list[str] = field(default_factory=list)
    limit: int | None = 100  # items per benchmark, drawn with ``seed``; null: all
    limits: dict[str, int] = field(default_factory=dict)  # per-benchmark overrides of ``limit``
    source: Literal["local", "hub"] = "local"
    data_dir: str | None = "../shared/data"
    length_normalized: bool = False
    mmlu_shots: int = 5  # dev exemplars before each MMLU question (0: zero-shot)
    mmlu_cloze: bool = False  # score each answer's text (lighteval's "MMLU (cloze)"), not the letter
    max_new_tokens: int | None = None  # cap on BBH/GSM8K generations (null: their standard 512/256)

    def __post_init__(self) -> None:
        for name in self.names:
            try:
                parse_benchmark_name(name)
            except ValueError as exc:
                raise ValueError(f"benchmarks.names: {exc}") from exc
        for name in self.limits:
            try:
                parse_benchmark_name(name)
            except ValueError as exc:
                raise ValueError(f"benchmarks.limits: {exc}") from exc
        limits = {"limit": self.limit, **{f"limits.{k}": v for k, v in self.limits.items()}}
        for where, value in limits.items():
            if value is not None and value < 1:
                raise ValueError(f"benchmarks.{where} must be >= 1 or null, got {value}")
        if self.mmlu_shots < 0:
            raise ValueError(f"benchmarks.mmlu_shots must be >= 0, got {self.mmlu_shots}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"benchmarks.max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")


@dataclass
class JudgeConfig:
    """The OpenAI-compatible judge that MT-Bench and the rubric share. Judging is off unless ``base_url`` (or
    ``$C2F_JUDGE_BASE_URL``) is set; ``model`` defaults to ``$C2F_JUDGE_MODEL`` or gpt-4; the key comes from
    ``$api_key_env`` (never from a file under version control)."""

    base_url: str | None = None  # e.g. https://api.openai.com/v1; null: $C2F_JUDGE_BASE_URL, else no judging
    model: str | None = None  # null: $C2F_JUDGE_MODEL, else gpt-4
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (none sent when unset)
    max_tokens: int = 1024  # judgment length cap
    temperature: float = 0.0  # FastChat judges at 0
    max_workers: int = 4  # judge requests in flight
    timeout: float = 120.0  # seconds per request
    note: str | None = None  # copied into every judged output and report, e.g. a weak-judge caveat

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"judge.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"judge.temperature must be >= 0, got {self.temperature}")
        if self.timeout <= 0:
            raise ValueError(f"judge.timeout must be > 0, got {self.timeout}")

    def resolved_base_url(self) -> str | None:
        return self.base_url or os.environ.get(JUDGE_BASE_URL_ENV) or None

    def resolved_model(self) -> str:
        return self.model or os.environ.get(JUDGE_MODEL_ENV) or "gpt-4"

    def client_config(self) -> JudgeClientConfig:
        base_url = self.resolved_base_url()
        if base_url is None:
            raise ValueError(f"judge.base_url is not set (nor ${JUDGE_BASE_URL_ENV})")
        return JudgeClientConfig(
            base_url=base_url,
            model=self.resolved_model(),
            api_key_env=self.api_key_env,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            timeout_s=self.timeout,
        )

    def describe(self) -> dict[str, str | None]:
        """What outputs record about the judge: endpoint, model and the caller's note."""
        return {"base_url": self.resolved_base_url(), "model": self.resolved_model(), "note": self.note}


@dataclass
class MTBenchEvalConfig:
    """MT-Bench answers (greedy, two turns) graded 1-10 by the judge, and, with a ``baseline``, FastChat's
    pairwise games against the baseline's answers (generated with it, or read from an earlier eval's
    ``mt_bench.json``). Runs when the judge is configured."""

    enabled: bool = True
    questions: str = "../shared/data/mt_bench/question.jsonl"
    judge_prompts: str = "../shared/data/mt_bench/judge_prompts.jsonl"
    reference_answers: str = "../shared/data/mt_bench/reference_answer/gpt-4.jsonl"
    per_category: int | None = None  # the first N questions of each category (a subset that covers all 8)
    limit: int | None = None  # then the first N questions
    max_new_tokens: int = 256
    pairwise: bool = True  # play pairwise games against ``baseline`` when one is given

    def __post_init__(self) -> None:
        for name in ("per_category", "limit", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"mt_bench.{name} must be >= 1, got {value}")


@dataclass
class RubricEvalConfig:
    """ICE-GRT's 8-criteria PASS/FAIL rubric (``eval.rubric``) on the held-out responses (and the baseline's);
    runs when the judge is configured and ``responses`` are generated. ``weights``: criterion -> weight for
    the overall score, 1.0 for criteria left out (ICE-GRT's own weights are missing from our copy)."""

    enabled: bool = True
    weights: dict[str, float] = field(default_factory=dict)  # e.g. {safety: 2}; unlisted criteria: 1.0
    limit: int | None = None  # judge the first N held-out responses (null: all of responses.num_prompts)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"rubric.limit must be >= 1 or null, got {self.limit}")
        self.weights = resolve_weights(self.weights, "rubric.weights")


@dataclass
class EvalConfig:
    """``checkpoint``: a c2f checkpoint, a training root (its latest step; ``actor/`` of a PPO step) or a
    Hugging Face Mistral directory (converted once into ``out_dir/converted``). ``rm``: the reward model (a
    ``value`` checkpoint or root); without it reward and win rate are left out. ``baseline``: a checkpoint
    whose responses the win rate compares against, or an earlier ``c2f eval`` output directory whose
    scored responses are reused (same prompts and reward model required)."""

    checkpoint: str | None = None
    name: str | None = None  # row label; default: the checkpoint directory's name
    rm: str | None = None
    baseline: str | None = None
    tokenizer: str | None = None  # load_tokenizer spec; None = Mistral v0.1 sentencepiece
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    backend: Literal["megatron", "hf"] = "megatron"  # hf: transformers on a Hugging Face directory
    layer_spec: Literal["sdpa", "local"] = "sdpa"
    batch_size: int = 8
    seed: int = 0
    out_dir: str = "runs/eval"
    report_name: str = "eval"
    responses: ResponseEvalConfig = field(default_factory=ResponseEvalConfig)
    benchmarks: BenchmarkEvalConfig = field(default_factory=BenchmarkEvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    mt_bench: MTBenchEvalConfig = field(default_factory=MTBenchEvalConfig)
    rubric: RubricEvalConfig = field(default_factory=RubricEvalConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.report_name or "/" in self.report_name:
            raise ValueError(f"report_name must be a file name (no '/'), got {self.report_name!r}")
        if not self.out_dir:
            raise ValueError("out_dir must not be empty")
