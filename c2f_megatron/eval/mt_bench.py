"""MT-Bench: two-turn answers, FastChat judge requests, an OpenAI-compatible judge client and the scores.

The judge requests follow FastChat's ``llm_judge`` exactly (judge prompt names, template fields, reference
answers for math/reasoning/coding, system prompt, temperature 0, ``[[rating]]`` / ``[[A]]`` parsing, pairwise
games played in both orders) so that our numbers are comparable with published MT-Bench scores; only the
HTTP client (``judge_client``) is our own, written on the standard library so evaluation needs no extra
dependency.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from c2f_megatron.eval.benchmarks import read_jsonl, require_field
from c2f_megatron.eval.judge_client import OpenAIChatClient, map_concurrent
from c2f_megatron.eval.protocol import truncate_at_stop

# The categories of MT-Bench (and the axes of the paper's Figure 3), in that order.
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# FastChat's NEED_REF_CATS: judged with the reference-guided "math" prompts and GPT-4 reference answers.
NEED_REF_CATS = frozenset({"math", "reasoning", "coding"})

_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")

Verdict = Literal["A", "B", "tie", "error"]
Winner = Literal["model_a", "model_b", "tie", "error"]
Answers = dict[int, tuple[str, str]]


class MTBenchDataError(ValueError):
    """An MT-Bench file is missing or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, str]


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: Literal["single", "pairwise"]
    system_prompt: str
    prompt_template: str
    output_format: str


@dataclass(frozen=True)
class JudgeRequest:
    """One call to the judge: what FastChat sends for (question, turn, answer(s))."""

    question_id: int
    category: str
    turn: int
    judge_name: str
    system_prompt: str
    user_prompt: str

    def messages(self) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.user_prompt},
        ]


# ----------------------------------------------------------------------------------------------- loading


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path, MTBenchDataError)


def _get(row: dict[str, Any], key: str, where: str) -> Any:
    return require_field(row, key, where, MTBenchDataError)


def load_questions(path: Path | str) -> list[Question]:
    """question.jsonl: question_id, category, turns (2 user prompts)."""
    path = Path(path)
    out = []
    for k, r in enumerate(_read_jsonl(path), 1):
        where = f"{path}:{k}"
        turns = _get(r, "turns", where)
        if not isinstance(turns, list) or len(turns) != 2:
            raise MTBenchDataError(f"{where}: field 'turns' must be a list of 2 prompts")
        out.append(
            Question(
                int(_get(r, "question_id", where)), str(_get(r, "category", where)), (turns[0], turns[1])
            )
        )
    return out


def select_questions(
    questions: Sequence[Question], per_category: int | None = None, limit: int | None = None
) -> list[Question]:
    """The first ``per_category`` questions of each category (all when None), in file order, then the
    first ``limit`` of those."""
    seen: dict[str, int] = {}
    out = []
    for q in questions:
        seen[q.category] = seen.get(q.category, 0) + 1
        if per_category is None or seen[q.category] <= per_category:
            out.append(q)
    return out[:limit]


def load_reference_answers(path: Path | str) -> Answers:
    """reference_answer/gpt-4.jsonl -> {question_id: (turn-1 answer, turn-2 answer)} (FastChat uses choice 0)."""
    path = Path(path)
    out: Answers = {}
    for k, r in enumerate(_read_jsonl(path), 1):
        where = f"{path}:{k}"
        choices = _get(r, "choices", where)
        if not choices or len(_get(choices[0], "turns", f"{where} choices[0]")) < 2:
            raise MTBenchDataError(f"{where}: field 'choices[0].turns' must hold 2 answers")
        out[int(_get(r, "question_id", where))] = (choices[0]["turns"][0], choices[0]["turns"][1])
    return out


def load_judge_prompts(path: Path | str) -> dict[str, JudgePrompt]:
    """judge_prompts.jsonl -> {name: JudgePrompt}."""
    path = Path(path)
    out = {}
    for k, r in enumerate(_read_jsonl(path), 1):
        where = f"{path}:{k}"
        name = _get(r, "name", where)
        out[name] = JudgePrompt(
            name,
            _get(r, "type", where),
            _get(r, "system_prompt", where),
            _get(r, "prompt_template", where),
            _get(r, "output_format", where),
        )
    return out


# ----------------------------------------------------------------------------------------------- requests


def judge_name(kind: Literal["single", "pairwise"], category: str, turn: int) -> str:
    """FastChat's choice of judge prompt: math variant for NEED_REF_CATS, multi-turn variant for turn 2."""
    if turn not in (1, 2):
        raise ValueError(f"MT-Bench turn must be 1 or 2, got {turn}")
    math = category in NEED_REF_CATS
    if kind == "single":
        base = "single-math-v1" if math else "single-v1"
    else:
        base = "pair-math-v1" if math else "pair-v2"
    return base + ("-multi-turn" if turn == 2 else "")


def _reference_kwargs(question: Question, references: Answers, turn: int) -> dict[str, str]:
    if question.category not in NEED_REF_CATS:
        return {}
    if question.question_id not in references:
        raise MTBenchDataError(
            f"question {question.question_id} ({question.category}) needs a reference answer; "
            "none in the reference_answer file"
        )
    ref = references[question.question_id]
    return {"ref_answer_1": ref[0], **({"ref_answer_2": ref[1]} if turn == 2 else {})}


def _prompt(prompts: dict[str, JudgePrompt], name: str) -> JudgePrompt:
    if name not in prompts:
        raise MTBenchDataError(f"judge prompt {name!r} not found in judge_prompts.jsonl")
    return prompts[name]


def _request(
    kind: str,
    question: Question,
    answers: dict[str, tuple[str, str]],
    prompts: dict[str, JudgePrompt],
    references: Answers,
    turn: int,
) -> JudgeRequest:
    """Fill the judge template of ``kind`` for one turn. ``answers`` maps the template's answer-field suffix
    ("" for single grading, "_a"/"_b" for pairs) to a model's two turns: turn 1 templates name the fields
    ``answer{suffix}``, turn 2 templates ``answer{suffix}_1`` and ``answer{suffix}_2``."""
    name = judge_name(kind, question.category, turn)
    jp = _prompt(prompts, name)
    fields = _reference_kwargs(question, references, turn)
    if turn == 2:
        fields.update(question_1=question.turns[0], question_2=question.turns[1])
        for suffix, answer in answers.items():
            fields[f"answer{suffix}_1"], fields[f"answer{suffix}_2"] = answer[0], answer[1]
    else:
        fields["question"] = question.turns[0]
        for suffix, answer in answers.items():
            fields[f"answer{suffix}"] = answer[0]
    user = jp.prompt_template.format(**fields)
    return JudgeRequest(question.question_id, question.category, turn, name, jp.system_prompt, user)


def build_single_request(
    question: Question,
    answer: tuple[str, str],
    prompts: dict[str, JudgePrompt],
    references: Answers,
    turn: int,
) -> JudgeRequest:
    """The single-answer grading request for one turn (FastChat ``run_judge_single``)."""
    return _request("single", question, {"": answer}, prompts, references, turn)


def build_pair_request(
    question: Question,
    answer_a: tuple[str, str],
    answer_b: tuple[str, str],
    prompts: dict[str, JudgePrompt],
    references: Answers,
    turn: int,
) -> JudgeRequest:
    """The pairwise comparison request for one turn, A first (FastChat ``run_judge_pair``)."""
    return _request("pairwise", question, {"_a": answer_a, "_b": answer_b}, prompts, references, turn)


# ----------------------------------------------------------------------------------------------- parsing


def parse_rating(judgment: str) -> float | None:
    """The "[[x]]" rating (FastChat falls back to "[x]"); None when the judge gave none."""
    match = _SCORE.search(judgment) or _SCORE_BACKUP.search(judgment)
    if not match:
        return None
    return float(ast.literal_eval(match.group(1)))


def parse_verdict(judgment: str) -> Verdict:
    """ "[[A]]", "[[B]]" or "[[C]]" (tie), checked in that order as FastChat does."""
    if "[[A]]" in judgment:
        return "A"
    if "[[B]]" in judgment:
        return "B"
    if "[[C]]" in judgment:
        return "tie"
    return "error"


def combine_games(g1: Verdict, g2: Verdict) -> Winner:
    """Game 1 shows (model_a, model_b), game 2 the swapped order; only a consistent verdict wins.

    Inconsistent verdicts count as a tie (FastChat's show_result); an unparsable game makes the pair an error.
    """
    if g1 == "error" or g2 == "error":
        return "error"
    w1 = {"A": "model_a", "B": "model_b", "tie": "tie"}[g1]
    w2 = {"A": "model_b", "B": "model_a", "tie": "tie"}[g2]
    return w1 if w1 == w2 else "tie"


# ----------------------------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class SingleJudgment:
    question_id: int
    category: str
    turn: int
    judge_name: str
    score: float | None
    judgment: str


@dataclass(frozen=True)
class PairJudgment:
    question_id: int
    category: str
    turn: int
    judge_name: str
    g1: Verdict
    g2: Verdict
    winner: Winner
    judgments: tuple[str, str]


def _answer(answers: Answers, qid: int, who: str) -> tuple[str, str]:
    if qid not in answers:
        raise MTBenchDataError(f"no {who} answer for question {qid}")
    return answers[qid]


def judge_single(
    questions: Sequence[Question],
    answers: Answers,
    client: OpenAIChatClient,
    prompts: dict[str, JudgePrompt],
    references: Answers,
    turns: Sequence[int] = (1, 2),
    max_workers: int = 1,
) -> list[SingleJudgment]:
    """Grade every (question, turn) 1-10; a missing rating is kept as ``score=None`` (FastChat's -1)."""
    requests = [
        build_single_request(q, _answer(answers, q.question_id, "model"), prompts, references, t)
        for q in questions
        for t in turns
    ]

    def run(r: JudgeRequest) -> SingleJudgment:
        text = client.complete(r.messages())
        return SingleJudgment(r.question_id, r.category, r.turn, r.judge_name, parse_rating(text), text)

    return map_concurrent(run, requests, max_workers)


def judge_pairwise(
    questions: Sequence[Question],
    answers_a: Answers,
    answers_b: Answers,
    client: OpenAIChatClient,
    prompts: dict[str, JudgePrompt],
    references: Answers,
    turns: Sequence[int] = (1, 2),
    max_workers: int = 1,
) -> list[PairJudgment]:
    """Compare model A with model B (e.g. the baseline) per (question, turn), in both presentation orders."""
    jobs = []
    for q in questions:
        a, b = _answer(answers_a, q.question_id, "model A"), _answer(answers_b, q.question_id, "model B")
        for t in turns:
            jobs.append(
                (
                    build_pair_request(q, a, b, prompts, references, t),
                    build_pair_request(q, b, a, prompts, references, t),
                )
            )

    def run(pair: tuple[JudgeRequest, JudgeRequest]) -> PairJudgment:
        r1, r2 = pair
        t1, t2 = client.complete(r1.messages()), client.complete(r2.messages())
        g1, g2 = parse_verdict(t1), parse_verdict(t2)
        return PairJudgment(
            r1.question_id, r1.category, r1.turn, r1.judge_name, g1, g2, combine_games(g1, g2), (t1, t2)
        )

    return map_concurrent(run, jobs, max_workers)


# ----------------------------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class MTBenchScores:
    """Mean judge scores (errors excluded): per category (both turns), per turn, per (category, turn)."""

    overall: float
    per_turn: dict[int, float]
    per_category: dict[str, float]
    per_category_turn: dict[tuple[str, int], float]
    n_scored: int
    n_errors: int


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def aggregate_single(judgments: Sequence[SingleJudgment]) -> MTBenchScores:
    """Averages as in FastChat's show_result and the paper's Figure 3 (category order from ``CATEGORIES``)."""
    scored = [j for j in judgments if j.score is not None]
    cats = [c for c in CATEGORIES if any(j.category == c for j in judgments)]
    cats += sorted({j.category for j in judgments} - set(CATEGORIES))
    turns = sorted({j.turn for j in judgments})
    return MTBenchScores(
        overall=_mean([j.score for j in scored]),
        per_turn={t: _mean([j.score for j in scored if j.turn == t]) for t in turns},
        per_category={c: _mean([j.score for j in scored if j.category == c]) for c in cats},
        per_category_turn={
            (c, t): _mean([j.score for j in scored if j.category == c and j.turn == t])
            for c in cats
            for t in turns
        },
        n_scored=len(scored),
        n_errors=len(judgments) - len(scored),
    )


@dataclass(frozen=True)
class PairSummary:
    """Counts for model A; ``win_rate`` = wins / decided pairs, ``win_rate_adjusted`` counts ties as half."""

    wins: int
    losses: int
    ties: int
    errors: int
    win_rate: float
    win_rate_adjusted: float


def aggregate_pairwise(judgments: Sequence[PairJudgment], category: str | None = None) -> PairSummary:
    js = [j for j in judgments if category is None or j.category == category]
    wins = sum(j.winner == "model_a" for j in js)
    losses = sum(j.winner == "model_b" for j in js)
    ties = sum(j.winner == "tie" for j in js)
    total = wins + losses + ties
    return PairSummary(
        wins,
        losses,
        ties,
        len(js) - total,
        wins / total if total else float("nan"),
        (wins + 0.5 * ties) / total if total else float("nan"),
    )


def pairwise_by_category(judgments: Sequence[PairJudgment]) -> dict[str, PairSummary]:
    """``aggregate_pairwise`` overall (key ``"overall"``) and per category, in ``CATEGORIES`` order."""
    cats = [c for c in CATEGORIES if any(j.category == c for j in judgments)]
    cats += sorted({j.category for j in judgments} - set(CATEGORIES))
    return {"overall": aggregate_pairwise(judgments), **{c: aggregate_pairwise(judgments, c) for c in cats}}


# ----------------------------------------------------------------------------------------------- answers


Chat = list[dict[str, str]]


def generate_answers(questions: Sequence[Question], respond: Callable[[list[Chat]], list[str]]) -> Answers:
    """Two-turn answers in two batches: ``respond`` gets chats (OpenAI-style messages) and returns one reply
    each; first every question's turn 1, then every turn 2, which sees the first question, the model's own
    first answer and the second question (the same answers as asking one chat at a time)."""
    firsts = respond([[{"role": "user", "content": q.turns[0]}] for q in questions])
    if len(firsts) != len(questions):
        raise ValueError(f"respond returned {len(firsts)} replies for {len(questions)} chats")
    seconds = respond(
        [
            [
                {"role": "user", "content": q.turns[0]},
                {"role": "assistant", "content": a},
                {"role": "user", "content": q.turns[1]},
            ]
            for q, a in zip(questions, firsts)
        ]
    )
    if len(seconds) != len(questions):
        raise ValueError(f"respond returned {len(seconds)} replies for {len(questions)} chats")
    return {q.question_id: (a, b) for q, a, b in zip(questions, firsts, seconds)}


def model_responder(model: Any, chat: Any, max_new_tokens: int) -> Callable[[list[Chat]], list[str]]:
    """``respond`` for ``generate_answers`` from a ``TokenLM`` and a ``ChatFormat``: all chats in one
    greedy ``generate_ids`` call (the model batches by its batch size), each reply cut at the format's stop
    strings."""

    def respond(chats: list[Chat]) -> list[str]:
        prompts = [
            chat.encode_prompt(
                chat.render([("user" if m["role"] == "user" else "assistant", m["content"]) for m in c])
            )
            for c in chats
        ]
        out = model.generate_ids(prompts, max_new_tokens) if prompts else []
        return [truncate_at_stop(model.decode_response(r), chat.stop_strings).strip() for r in out]

    return respond


def answers_to_json(questions: Sequence[Question], answers: Answers) -> dict[str, Any]:
    """The ``questions`` and ``answers`` fields of ``mt_bench.json`` (read back by ``load_answers``)."""
    return {
        "questions": {str(q.question_id): list(q.turns) for q in questions},
        "answers": {str(q.question_id): list(answers[q.question_id]) for q in questions},
    }


def load_answers(path: Path | str, questions: Sequence[Question]) -> Answers:
    """The answers in an earlier eval's ``mt_bench.json``; refuses a file written for other questions."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MTBenchDataError(f"{path}: cannot read MT-Bench answers ({exc})") from exc
    want = answers_to_json(questions, {q.question_id: ("", "") for q in questions})["questions"]
    if doc.get("questions") != want:
        raise MTBenchDataError(
            f"{path}: field 'questions' differs from this run's MT-Bench questions; evaluate the baseline "
            "with the same mt_bench.questions / limit"
        )
    answers = doc.get("answers")
    if not isinstance(answers, dict) or any(
        not isinstance(answers.get(k), list) or len(answers[k]) != 2 for k in want
    ):
        raise MTBenchDataError(f"{path}: field 'answers' must hold two turns for every question")
    return {int(k): (answers[k][0], answers[k][1]) for k in want}
