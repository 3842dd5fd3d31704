"""ICE-GRT rubric: the strict parser, weights validation, aggregation against a slow reference, judging."""

from __future__ import annotations

import math
import random

import pytest

from c2f_megatron.eval.rubric import (
    CRITERIA,
    DEFINITIONS,
    WEIGHTS_NOTE,
    RubricItem,
    RubricParseError,
    aggregate,
    build_messages,
    judge_rubric,
    judgment_from_text,
    parse_judgment,
    resolve_weights,
)


def _lines(verdicts: dict[str, bool]) -> str:
    return "\n".join(f"{c.capitalize()}: [[{'PASS' if verdicts[c] else 'FAIL'}]]" for c in verdicts)


ALL_PASS = dict.fromkeys(CRITERIA, True)


def test_eight_criteria_each_defined_in_one_sentence():
    assert CRITERIA == (
        "clarity", "accuracy", "completeness", "safety", "courtesy", "comfort", "conciseness", "context",
    )  # fmt: skip
    assert all(d.endswith(".") and d.count(". ") == 0 for d in DEFINITIONS.values())
    assert "missing" in WEIGHTS_NOTE and "equal by default" in WEIGHTS_NOTE


def test_request_holds_dialogue_answer_and_format():
    system, user = build_messages("Human: hi there\n\nAssistant:", "Hello! How can I help?")
    assert system["role"] == "system" and user["role"] == "user"
    assert "Human: hi there" in user["content"] and "Hello! How can I help?" in user["content"]
    for c in CRITERIA:
        assert f"{c.capitalize()}: [[PASS or FAIL]]" in user["content"] and DEFINITIONS[c] in user["content"]


def test_parser_accepts_the_format_with_reasoning_around_it():
    verdicts = {c: i % 2 == 0 for i, c in enumerate(CRITERIA)}
    text = "The answer is mostly fine.\n\n" + _lines(verdicts) + "\nOverall a decent reply."
    assert parse_judgment(text) == verdicts
    # lower case names and verdicts, markdown bullets and bold, and reasons after the verdict
    loose = "\n".join(f"- **{c}**: [[{'pass' if v else 'fail'}]] because" for c, v in verdicts.items())
    assert parse_judgment(loose) == verdicts


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (_lines({c: True for c in CRITERIA if c != "safety"}), "no verdict for safety"),
        (_lines(ALL_PASS) + "\nClarity: [[PASS]]", "clarity: duplicate verdicts"),
        (_lines(ALL_PASS) + "\nclarity: [[FAIL]]", "clarity: contradictory verdicts"),
        (_lines(ALL_PASS) + "\nHelpfulness: [[PASS]]", "unknown criterion 'Helpfulness'"),
        (_lines(ALL_PASS).replace("Comfort: [[PASS]]", "Comfort: [[MAYBE]]"), "neither PASS nor FAIL"),
        ("Clarity PASS, accuracy PASS, all good: [[PASS]]", "no verdict for clarity"),
        ("", "no verdict for clarity, accuracy"),
    ],
    ids=["missing", "duplicate", "contradictory", "unknown", "other-verdict", "free-text", "empty"],
)
def test_parser_refuses_incomplete_or_ambiguous_judgments(text, error):
    with pytest.raises(RubricParseError, match=error):
        parse_judgment(text)
    j = judgment_from_text(3, text)
    assert j.verdicts is None and error in j.error and j.judgment == text and j.index == 3


def test_weights_default_equal_and_validation_names_the_field():
    assert resolve_weights({}) == dict.fromkeys(CRITERIA, 1.0)
    assert resolve_weights({"safety": 3})["safety"] == 3.0
    with pytest.raises(ValueError, match=r"^rubric\.weights: unknown criterion 'helpfulness'"):
        resolve_weights({"helpfulness": 1.0})
    with pytest.raises(ValueError, match=r"^rubric\.weights\.safety must be a finite number >= 0, got -1"):
        resolve_weights({"safety": -1})
    with pytest.raises(ValueError, match=r"^x\.w\.clarity must be a finite number"):
        resolve_weights({"clarity": float("nan")}, "x.w")
    with pytest.raises(ValueError, match=r"^rubric\.weights: at least one weight must be > 0"):
        resolve_weights(dict.fromkeys(CRITERIA, 0))


def _reference(texts: list[str], weights: dict[str, float]) -> tuple[dict, dict, float, float, int]:
    """Slow reference: walk every item and criterion, an unparsable judgment passes nothing."""
    w = {c: weights.get(c, 1.0) for c in CRITERIA}
    passes = dict.fromkeys(CRITERIA, 0)
    errors = 0
    for t in texts:
        try:
            v = parse_judgment(t)
        except RubricParseError:
            errors += 1
            continue
        for c in CRITERIA:
            if v[c]:
                passes[c] += 1
    n, ok = len(texts), len(texts) - errors
    rate = {c: passes[c] / n for c in CRITERIA}
    rate_ok = {c: (passes[c] / ok if ok else math.nan) for c in CRITERIA}
    score = sum(w[c] * rate[c] for c in CRITERIA) / sum(w.values())
    score_ok = sum(w[c] * rate_ok[c] for c in CRITERIA) / sum(w.values())
    return rate, rate_ok, score, score_ok, errors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_matches_slow_reference(seed):
    rng = random.Random(seed)
    texts = []
    for _ in range(rng.randint(5, 40)):
        if rng.random() < 0.2:
            texts.append("I cannot judge this. Clarity: [[PASS]]")
        else:
            texts.append(_lines({c: rng.random() < 0.6 for c in CRITERIA}))
    weights = {c: rng.choice([0.0, 0.5, 1.0, 2.0]) for c in CRITERIA}
    weights["safety"] = 3.0
    scores = aggregate([judgment_from_text(i, t) for i, t in enumerate(texts)], weights)
    rate, rate_ok, score, score_ok, errors = _reference(texts, weights)
    assert scores.n_items == len(texts) and scores.n_errors == errors
    assert scores.pass_rate == pytest.approx(rate)
    assert scores.score == pytest.approx(score) and scores.score_parsed == pytest.approx(score_ok)
    for c in CRITERIA:
        assert scores.pass_rate_parsed[c] == pytest.approx(rate_ok[c], nan_ok=True)


def test_errors_never_count_as_passes():
    judgments = [judgment_from_text(0, _lines(ALL_PASS)), judgment_from_text(1, "All good: [[PASS]]")]
    scores = aggregate(judgments, {})
    assert scores.n_errors == 1
    assert scores.pass_rate == dict.fromkeys(CRITERIA, 0.5) and scores.score == 0.5
    assert scores.pass_rate_parsed == dict.fromkeys(CRITERIA, 1.0) and scores.score_parsed == 1.0


class _ScriptedClient:
    """Fails ``conciseness`` for answers containing "long", garbles answers containing "??"."""

    def __init__(self):
        self.calls: list[list[dict]] = []

    def complete(self, messages):
        self.calls.append(messages)
        user = messages[1]["content"]
        answer = user.split("[The Start of the Assistant's Answer]\n", 1)[1].split("\n[The End", 1)[0]
        if "??" in answer:
            return "No idea."
        return _lines({c: not (c == "conciseness" and "long" in answer) for c in CRITERIA})


def test_judge_rubric_calls_the_client_once_per_item():
    items = [RubricItem(f"Human: q{i}", a) for i, a in enumerate(["short", "a long one", "??", "fine"])]
    client = _ScriptedClient()
    judgments, scores = judge_rubric(items, client, {"conciseness": 2.0}, max_workers=3)
    assert len(client.calls) == 4 and [j.index for j in judgments] == [0, 1, 2, 3]
    assert judgments[2].verdicts is None and judgments[2].judgment == "No idea."
    assert scores.n_errors == 1 and scores.pass_rate["conciseness"] == 0.5
    assert scores.pass_rate["clarity"] == 0.75
    assert scores.score == pytest.approx((7 * 0.75 + 2 * 0.5) / 9)
    with pytest.raises(ValueError, match="rubric.weights"):
        judge_rubric(items, client, {"bogus": 1.0})
    assert len(client.calls) == 4  # bad weights refused before any call
