"""Scoring items through the ``LanguageModel`` protocol: argmax log-likelihood (multiple choice), exact
match after extraction (generation), and the summary of outcomes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from c2f_megatron.eval.benchmarks.items import (
    BenchmarkResult,
    GenerationItem,
    ItemOutcome,
    MultipleChoiceItem,
)
from c2f_megatron.eval.extraction import bbh_exact_match, extract_bbh_answer, extract_gsm8k_answer
from c2f_megatron.eval.protocol import LanguageModel

# ----------------------------------------------------------------------------------------------- scoring


def _chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the earliest index (so a constant model always picks 0)."""
    best = 0
    for k in range(1, len(values)):
        if values[k] > values[best]:
            best = k
    return best


def score_multiple_choice(
    items: Sequence[MultipleChoiceItem],
    model: LanguageModel,
    length_normalized: bool = False,
    batch_size: int = 32,
) -> list[ItemOutcome]:
    """Accuracy outcomes by argmax log-likelihood (divided by continuation characters when normalised)."""
    outcomes = []
    for chunk in _chunks(items, batch_size):
        requests = [
            (ctx, cont) for it in chunk for ctx, cont in zip(it.contexts, it.continuations, strict=True)
        ]
        lls = model.loglikelihood(requests)
        if len(lls) != len(requests):
            raise RuntimeError(f"model returned {len(lls)} log-likelihoods for {len(requests)} requests")
        pos = 0
        for it in chunk:
            scores = list(lls[pos : pos + len(it.continuations)])
            pos += len(it.continuations)
            if length_normalized:
                scores = [s / max(len(c), 1) for s, c in zip(scores, it.continuations)]
            pred = argmax_first(scores)
            outcomes.append(
                ItemOutcome(
                    it.item_id,
                    it.subtask,
                    str(it.gold),
                    str(pred),
                    pred == it.gold,
                    1.0 / len(it.continuations),
                )
            )
    return outcomes


def score_generation(
    items: Sequence[GenerationItem],
    model: LanguageModel,
    max_new_tokens: int,
    stop: list[str],
    batch_size: int = 32,
) -> list[ItemOutcome]:
    """Exact-match outcomes after the extraction matching each item's kind."""
    outcomes = []
    for chunk in _chunks(items, batch_size):
        gens = model.generate([it.prompt for it in chunk], max_new_tokens, stop)
        if len(gens) != len(chunk):
            raise RuntimeError(f"model returned {len(gens)} generations for {len(chunk)} prompts")
        for it, gen in zip(chunk, gens):
            if it.kind == "gsm8k":
                pred = extract_gsm8k_answer(gen)
                correct = pred is not None and pred == it.target
            else:
                pred = extract_bbh_answer(gen, multiple_choice=it.kind == "bbh_mc")
                correct = bbh_exact_match(pred, it.target)
            outcomes.append(ItemOutcome(it.item_id, it.subtask, it.target, pred or "", correct, it.chance))
    return outcomes


def summarize(
    name: str, metric: str, outcomes: Sequence[ItemOutcome], category_of: dict[str, str] | None = None
) -> BenchmarkResult:
    """Micro-average over items, per-subtask averages and their unweighted mean (macro), and micro-averages
    per category when ``category_of`` maps subtasks to categories."""
    if not outcomes:
        raise ValueError(f"benchmark {name!r}: no items were evaluated")
    by: dict[str, list[bool]] = {}
    by_cat: dict[str, list[bool]] = {}
    for o in outcomes:
        by.setdefault(o.subtask, []).append(o.correct)
        if category_of is not None:
            by_cat.setdefault(category_of.get(o.subtask, "unknown"), []).append(o.correct)
    subtasks = {k: sum(v) / len(v) for k, v in sorted(by.items())}
    return BenchmarkResult(
        name=name,
        metric=metric,
        value=sum(o.correct for o in outcomes) / len(outcomes),
        n=len(outcomes),
        chance=sum(o.chance for o in outcomes) / len(outcomes),
        macro=sum(subtasks.values()) / len(subtasks),
        subtasks=subtasks,
        outcomes=tuple(outcomes),
        categories={k: sum(v) / len(v) for k, v in sorted(by_cat.items())},
    )
