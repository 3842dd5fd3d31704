"""Benchmark scorers against the real shared/data files.

Gold oracles are built here from the raw files (not from the scorer's own loaders) and answer only when the
prompt is in the expected format, so a 100% score checks the prompt format, the gold parsing and the scoring
together. Constant models check the chance figures: with ties broken to the first choice, a model with equal
log-likelihoods scores exactly the share of items whose gold is the first choice.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from c2f_megatron.eval.benchmarks import (
    BenchmarkDataError,
    agieval_demos,
    evaluate_benchmark,
    mmlu_items,
    select_indices,
)
from c2f_megatron.eval.protocol import ScriptedModel
from c2f_megatron.eval.report import RunMetadata, benchmark_rows, write_report

LIMIT = 20
MISS = -5.0


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _mmlu_raw(data: Path) -> list[tuple[str, list[str]]]:
    """(subject, row) for every test row in sorted-subject file order; the copy here has a header row."""
    out = []
    for path in sorted((data / "mmlu" / "test").glob("*_test.csv")):
        subject = path.name[: -len("_test.csv")]
        rows = list(csv.reader(path.open(encoding="utf-8", newline="")))
        assert rows[0] == ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
        out += [(subject, r) for r in rows[1:]]
    return out


def _mmlu_block(row: list[str]) -> str:
    q, a, b, c, d = row[:5]
    return f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def _constant() -> ScriptedModel:
    return ScriptedModel(score=lambda ctx, cont: 0.0)


# ----------------------------------------------------------------------------------------------- MMLU


def test_mmlu_prompt_is_the_standard_5_shot_format(shared_data: Path):
    item = mmlu_items(shared_data, "local", ["college_biology"], 1, 0)[0]
    dev = list(
        csv.reader((shared_data / "mmlu/dev/college_biology_dev.csv").open(encoding="utf-8", newline=""))
    )[1:]
    test = list(
        csv.reader((shared_data / "mmlu/test/college_biology_test.csv").open(encoding="utf-8", newline=""))
    )[1:]
    i = int(item.item_id.rsplit("/", 1)[1])
    shots = "".join(_mmlu_block(r) + f" {'ABCD'[int(r[5])]}\n\n" for r in dev)
    expected = (
        "The following are multiple choice questions (with answers) about college biology.\n\n"
        + shots
        + _mmlu_block(test[i])
    )
    assert item.contexts == (expected,) * 4
    assert item.continuations == (" A", " B", " C", " D")
    assert item.gold == int(test[i][5])


def test_mmlu_gold_oracle_scores_100(shared_data: Path):
    gold = {_mmlu_block(r): " " + "ABCD"[int(r[5])] for _, r in _mmlu_raw(shared_data)}

    def score(ctx: str, cont: str) -> float:
        tail = re.split(r"\nAnswer: [ABCD]\n\n", ctx)[-1]  # the question after the 5 exemplars
        return 0.0 if gold[tail] == cont else MISS

    res = evaluate_benchmark("mmlu", ScriptedModel(score=score), limit=LIMIT, seed=3, data_dir=shared_data)
    assert (res.value, res.n, res.metric) == (1.0, LIMIT, "acc")


def test_mmlu_constant_model_scores_share_of_gold_A(shared_data: Path):
    raw = _mmlu_raw(shared_data)
    chosen = [raw[i] for i in select_indices(len(raw), 300, 11)]
    expected = sum(r[5] == "0" for _, r in chosen) / len(chosen)
    res = evaluate_benchmark("mmlu", _constant(), limit=300, seed=11, data_dir=shared_data)
    assert res.value == pytest.approx(expected, abs=1e-12)
    assert res.chance == pytest.approx(0.25)
    assert set(res.subtasks) == {s for s, _ in chosen}
    # categories: the micro-average over each category's items, computed here directly
    from c2f_megatron.eval.benchmarks import MMLU_CATEGORIES

    for category, subjects in MMLU_CATEGORIES.items():
        mine = [r for s, r in chosen if s in subjects]
        assert res.categories[category] == pytest.approx(sum(r[5] == "0" for r in mine) / len(mine))


def test_mmlu_categories_cover_every_subject_once_and_zero_shot(shared_data: Path):
    from c2f_megatron.eval.benchmarks import MMLU_CATEGORIES

    subjects = [s for group in MMLU_CATEGORIES.values() for s in group]
    local = {p.name[: -len("_test.csv")] for p in (shared_data / "mmlu/test").glob("*_test.csv")}
    assert len(subjects) == len(set(subjects)) == 57 and set(subjects) == local
    item = mmlu_items(shared_data, "local", ["college_biology"], 1, 0, shots=0)[0]
    assert item.contexts[0].startswith(
        "The following are multiple choice questions (with answers) about college biology.\n\n"
    )
    assert item.contexts[0].count("\nAnswer:") == 1
    cloze = mmlu_items(shared_data, "local", ["college_biology"], 1, 0, shots=1, cloze=True)[0]
    rec = next(r for s, r in _mmlu_raw(shared_data) if s == "college_biology" and r[0] in cloze.contexts[0])
    assert cloze.continuations == tuple(f" {c}" for c in rec[1:5]) and cloze.gold == int(rec[5])
    assert cloze.contexts[0].endswith(f"Question: {rec[0]}\nAnswer:") and "\nA. " not in cloze.contexts[0]


# ----------------------------------------------------------------------------------------------- ARC


@pytest.mark.parametrize("split", ["easy", "challenge"])
def test_arc_gold_oracle_and_constant(shared_data: Path, split: str):
    rows = _jsonl(shared_data / "arc" / f"arc_{split}.jsonl")
    gold = {r["query"]: " " + r["choices"][r["gold"]] for r in rows}

    def score(ctx: str, cont: str) -> float:
        shot, question = ctx.split("\n\n")
        assert shot.startswith("Question: ") and re.search(r"\nAnswer: \S", shot)
        assert question.endswith("\nAnswer:")
        return 0.0 if gold[question[: -len("\nAnswer:")]] == cont else MISS

    res = evaluate_benchmark(
        f"arc_{split}", ScriptedModel(score=score), limit=LIMIT, seed=0, data_dir=shared_data
    )
    assert (res.value, res.n) == (1.0, LIMIT)

    const = evaluate_benchmark(f"arc_{split}", _constant(), data_dir=shared_data)
    assert const.n == len(rows)
    assert const.value == pytest.approx(sum(r["gold"] == 0 for r in rows) / len(rows), abs=1e-12)
    assert const.chance == pytest.approx(0.25)


def test_acc_norm_divides_by_continuation_length(shared_data: Path):
    """A model paying 1 nat per character: acc picks the shortest choice, acc_norm ties and picks the first."""
    rows = _jsonl(shared_data / "arc" / "arc_challenge.jsonl")
    model = ScriptedModel(score=lambda ctx, cont: -float(len(cont)))
    acc = evaluate_benchmark("arc_challenge", model, data_dir=shared_data)
    norm = evaluate_benchmark("arc_challenge", model, data_dir=shared_data, length_normalized=True)
    shortest = [min(range(4), key=lambda k: (len(r["choices"][k]), k)) for r in rows]
    assert acc.value == pytest.approx(
        sum(s == r["gold"] for s, r in zip(shortest, rows)) / len(rows), abs=1e-12
    )
    assert norm.metric == "acc_norm"
    assert norm.value == pytest.approx(sum(r["gold"] == 0 for r in rows) / len(rows), abs=1e-12)


# ----------------------------------------------------------------------------------------------- WinoGrande


def test_winogrande_partial_scoring(shared_data: Path):
    rows = _jsonl(shared_data / "winogrande" / "winogrande.jsonl")
    gold = {(r["context_options"][r["gold"]], r["continuation"]) for r in rows}
    seen_options: list[str] = []

    def score(ctx: str, cont: str) -> float:
        shot, filled = ctx.split("\n\n")
        seen_options.append(filled)
        assert cont.startswith(" ")
        return 0.0 if (filled, cont[1:]) in gold else MISS

    res = evaluate_benchmark(
        "winogrande", ScriptedModel(score=score), limit=LIMIT, seed=0, data_dir=shared_data
    )
    assert (res.value, res.n) == (1.0, LIMIT)
    assert (
        len(seen_options) == 2 * LIMIT and len(set(seen_options)) > LIMIT
    )  # both option-filled contexts scored

    const = evaluate_benchmark("winogrande", _constant(), data_dir=shared_data)
    assert const.value == pytest.approx(sum(r["gold"] == 0 for r in rows) / len(rows), abs=1e-12)
    assert const.chance == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- AGIEval

AGIEVAL_EN = [
    "lsat-ar",
    "lsat-lr",
    "lsat-rc",
    "logiqa-en",
    "sat-math",
    "sat-en",
    "sat-en-without-passage",
    "aqua-rat",
]


def _agieval_block(r: dict, skip_passage: bool) -> str:
    passage = "" if skip_passage or r["passage"] is None else r["passage"]
    return f"{passage} {r['question']}\nChoose from the following options:    {' '.join(r['options'])}\n"


def test_agieval_gold_oracle_and_constant(shared_data: Path):
    pool = [(t, r) for t in AGIEVAL_EN for r in _jsonl(shared_data / "agieval" / "v1" / f"{t}.jsonl")]
    gold: dict[str, set[str]] = {}
    for t, r in pool:
        gold.setdefault(_agieval_block(r, t == "sat-en-without-passage"), set()).add(" " + r["label"])

    def score(ctx: str, cont: str) -> float:
        assert ctx.startswith("Here are the answers for the problems in the exam.\nProblem 1.   ")
        assert ctx.endswith("\nThe answer is therefore")
        block = re.split(r"Problem \d+\.   ", ctx)[-1][: -len("The answer is therefore")]
        return 0.0 if gold[block] == {cont} else MISS

    res = evaluate_benchmark("agieval", ScriptedModel(score=score), limit=LIMIT, seed=5, data_dir=shared_data)
    assert (res.value, res.n) == (1.0, LIMIT)

    chosen = [pool[i] for i in select_indices(len(pool), 400, 2)]
    const = evaluate_benchmark("agieval", _constant(), limit=400, seed=2, data_dir=shared_data)
    assert const.value == pytest.approx(sum(r["label"] == "A" for _, r in chosen) / 400, abs=1e-12)
    assert const.chance == pytest.approx(sum(1 / len(r["options"]) for _, r in chosen) / 400, abs=1e-12)


def test_agieval_demos_come_from_the_csv(shared_data: Path):
    demos = agieval_demos(shared_data / "agieval" / "few_shot_prompts.csv", "sat-math")
    assert len(demos) == 5 and all(d["label"] in "ABCD" for d in demos)
    assert agieval_demos(
        shared_data / "agieval" / "few_shot_prompts.csv", "sat-en-without-passage"
    ) == agieval_demos(shared_data / "agieval" / "few_shot_prompts.csv", "sat-en")
    with pytest.raises(BenchmarkDataError, match="multi-label"):
        evaluate_benchmark("agieval:jec-qa-ca", _constant(), data_dir=shared_data)


# ----------------------------------------------------------------------------------------------- BBH


def _bbh_raw(data: Path) -> list[tuple[str, dict]]:
    return [
        (p.stem, ex)
        for p in sorted((data / "bbh").glob("*.json"))
        for ex in json.loads(p.read_text(encoding="utf-8"))["examples"]
    ]


def _bbh_input(prompt: str) -> str:
    cue = "\nA: Let's think step by step."
    assert prompt.endswith(cue) and "canary" not in prompt.lower()
    return prompt.rsplit("\n\nQ: ", 1)[1][: -len(cue)]


def test_bbh_gold_oracle_scores_100_and_stop_is_honoured(shared_data: Path):
    gold = {ex["input"]: ex["target"] for _, ex in _bbh_raw(shared_data)}
    model = ScriptedModel(
        respond=lambda p: (
            f" Reasoning here. So the answer is {gold[_bbh_input(p)]}.\n\nQ: So the answer is (Z)."
        )
    )
    res = evaluate_benchmark("bbh", model, limit=LIMIT, seed=0, data_dir=shared_data)
    assert (res.value, res.n, res.metric) == (1.0, LIMIT, "exact_match")


def test_bbh_constant_model_and_chance(shared_data: Path):
    raw = _bbh_raw(shared_data)
    chosen = [raw[i] for i in select_indices(len(raw), 300, 4)]
    const = evaluate_benchmark(
        "bbh",
        ScriptedModel(respond=lambda p: "So the answer is (A)."),
        limit=300,
        seed=4,
        data_dir=shared_data,
    )
    assert const.value == pytest.approx(sum(ex["target"] == "(A)" for _, ex in chosen) / 300, abs=1e-12)

    nav = evaluate_benchmark("bbh:navigate,word_sorting", _constant_gen(), limit=None, data_dir=shared_data)
    assert nav.subtasks == {"navigate": 0.0, "word_sorting": 0.0}
    assert nav.chance == pytest.approx(0.5 * 250 / 500)  # navigate is Yes/No, word_sorting is open-ended
    dates = [ex for t, ex in raw if t == "date_understanding"]
    n_opts = [len(re.findall(r"^\([A-F]\)", ex["input"], re.M)) for ex in dates]
    date = evaluate_benchmark("bbh:date_understanding", _constant_gen(), data_dir=shared_data)
    assert date.chance == pytest.approx(sum(1 / k for k in n_opts) / len(dates), abs=1e-12)


def _constant_gen() -> ScriptedModel:
    return ScriptedModel(respond=lambda p: "I do not know.")


# ----------------------------------------------------------------------------------------------- GSM8K


def test_gsm8k_gold_oracle_and_constant(shared_data: Path):
    rows = _jsonl(shared_data / "gsm8k" / "test.jsonl")
    gold_raw = {r["question"]: r["answer"].split("####")[-1].strip() for r in rows}  # e.g. "2,125"

    def respond(prompt: str) -> str:
        assert prompt.count("Question: ") == 9 and prompt.endswith("\nAnswer:")  # 8 exemplars + the question
        q = prompt.rsplit("Question: ", 1)[1][: -len("\nAnswer:")]
        return f" Step by step. The answer is {gold_raw[q]}.\n\nQuestion: next? The answer is 0."

    res = evaluate_benchmark(
        "gsm8k", ScriptedModel(respond=respond), limit=LIMIT, seed=0, data_dir=shared_data
    )
    assert (res.value, res.n) == (1.0, LIMIT)
    with_comma = [r["question"] for r in rows if "," in gold_raw[r["question"]]]
    assert with_comma  # the data has "2,125"-style golds; they must be normalised on both sides

    golds = [g.replace(",", "") for g in gold_raw.values()]
    top = max(set(golds), key=golds.count)
    const = evaluate_benchmark(
        "gsm8k", ScriptedModel(respond=lambda p: f"The answer is {top}."), data_dir=shared_data
    )
    assert const.n == len(rows) and const.chance == 0.0
    assert const.value == pytest.approx(golds.count(top) / len(rows), abs=1e-12)


# ----------------------------------------------------------------------------------------------- misc


def test_selection_is_seeded_and_errors_are_clear(shared_data: Path, tmp_path: Path):
    assert select_indices(10, None, 0) == list(range(10))
    assert select_indices(100, 7, 1) == select_indices(100, 7, 1) != select_indices(100, 7, 2)
    with pytest.raises(ValueError, match="unknown benchmark"):
        evaluate_benchmark("hellaswag", _constant(), data_dir=shared_data)
    with pytest.raises(BenchmarkDataError, match=str(tmp_path / "arc")):
        evaluate_benchmark("arc_easy", _constant(), data_dir=tmp_path)
    bad = tmp_path / "mmlu"
    (bad / "test").mkdir(parents=True)
    (bad / "dev").mkdir()
    (bad / "test" / "x_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(BenchmarkDataError, match=r"x_test.csv row 1: field 'answer'"):
        evaluate_benchmark("mmlu", _constant(), data_dir=tmp_path)


def test_report_writes_markdown_csv_json(shared_data: Path, tmp_path: Path):
    results = [
        evaluate_benchmark("arc_easy", _constant(), limit=8, seed=0, data_dir=shared_data),
        evaluate_benchmark("gsm8k", _constant_gen(), limit=8, seed=0, data_dir=shared_data),
    ]
    meta = RunMetadata(model="mistral-7b-c2f", checkpoint="/ckpt/iter_100", seed=0, config={"limit": 8})
    paths = write_report(tmp_path / "out", "benchmarks", benchmark_rows(results), meta)
    doc = json.loads(paths.json.read_text())
    assert (doc["model"], doc["checkpoint"], doc["seed"], doc["config"]) == (
        "mistral-7b-c2f",
        "/ckpt/iter_100",
        0,
        {"limit": 8},
    )
    assert [r["benchmark"] for r in doc["rows"]] == ["arc_easy", "gsm8k"]
    assert doc["rows"][0]["value"] == results[0].value
    csv_rows = list(csv.DictReader(paths.csv.open()))
    assert (
        float(csv_rows[0]["value"]) == pytest.approx(results[0].value)
        and csv_rows[1]["metric"] == "exact_match"
    )
    md = paths.markdown.read_text()
    assert "- checkpoint: /ckpt/iter_100" in md and "| arc_easy | acc |" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "benchmarks.csv",
        "benchmarks.json",
        "benchmarks.md",
    ]
