"""Multiple-choice benchmarks scored by log-likelihood: MMLU (with its four categories), ARC-Easy/Challenge,
WinoGrande and AGIEval, in their standard few-shot formats."""

from __future__ import annotations

import ast
import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from c2f_megatron.eval.benchmarks.items import (
    LETTERS,
    BenchmarkDataError,
    MultipleChoiceItem,
    Source,
    _import_datasets,
    _other_index,
    _require_dir,
    read_jsonl,
    read_text,
    require_field,
    select_indices,
)

MMLU_SHOTS = 5

# AGIEval task groups as in the official src/dataset_loader.py; only single-answer multiple choice is scored.
AGIEVAL_ENGLISH_MC = (
    "lsat-ar",
    "lsat-lr",
    "lsat-rc",
    "logiqa-en",
    "sat-math",
    "sat-en",
    "sat-en-without-passage",
    "aqua-rat",
    "gaokao-english",
)
AGIEVAL_CHINESE_MC = (
    "logiqa-zh",
    "gaokao-chinese",
    "gaokao-geography",
    "gaokao-history",
    "gaokao-biology",
    "gaokao-chemistry",
    "gaokao-physics",
    "gaokao-mathqa",
)
# The usual "AGIEval (en)" multiple-choice set (lm-eval agieval_en without the cloze task "math").
AGIEVAL_DEFAULT = tuple(t for t in AGIEVAL_ENGLISH_MC if t != "gaokao-english")
AGIEVAL_UNSUPPORTED = {
    "jec-qa-ca": "every question may have several correct options (multi-label)",
    "jec-qa-kd": "every question may have several correct options (multi-label)",
    "math": "cloze (free-form) answers",
    "gaokao-mathcloze": "cloze (free-form) answers",
}

# Hendrycks et al.'s four MMLU categories (their categories.py, subjects grouped by subcategory).
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
    "social sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies", "sociology",
        "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
        "professional_accounting", "professional_medicine", "virology",
    ),
}  # fmt: skip
MMLU_CATEGORY_OF = {subject: cat for cat, subjects in MMLU_CATEGORIES.items() for subject in subjects}


# ----------------------------------------------------------------------------------------------- MMLU


@dataclass(frozen=True)
class MMLURecord:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int


def _parse_mmlu_answer(value: str, where: str) -> int:
    v = value.strip()
    if v in ("0", "1", "2", "3"):
        return int(v)
    if v in ("A", "B", "C", "D"):
        return "ABCD".index(v)
    raise BenchmarkDataError(f"{where}: field 'answer' must be 0-3 or A-D, got {value!r}")


def read_mmlu_csv(path: Path, subject: str) -> list[MMLURecord]:
    """Rows question,A,B,C,D,answer; a header row (question,choice0,...) is skipped; answer is 0-3 or A-D."""
    out = []
    for rowno, row in enumerate(_read_csv(path), 1):
        if rowno == 1 and row and row[0] == "question" and row[-1] == "answer":
            continue
        where = f"{path} row {rowno}"
        if len(row) != 6:
            raise BenchmarkDataError(f"{where}: expected 6 fields (question,A,B,C,D,answer), got {len(row)}")
        out.append(
            MMLURecord(subject, row[0], (row[1], row[2], row[3], row[4]), _parse_mmlu_answer(row[5], where))
        )
    if not out:
        raise BenchmarkDataError(f"{path}: no question rows")
    return out


def _read_csv(path: Path) -> list[list[str]]:
    """Rows of a benchmark CSV file (``read_text``); a row the csv module refuses names the file and row."""
    rows: list[list[str]] = []
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        for row in reader:
            rows.append(row)
    except csv.Error as e:
        raise BenchmarkDataError(f"{path} row {len(rows) + 1}: not valid CSV ({e})") from e
    return rows


def mmlu_format_example(rec: MMLURecord, with_answer: bool, cloze: bool = False) -> str:
    """Hendrycks et al.'s format: question, "A. .." lines, "Answer:" (+ " X\\n\\n" for exemplars). Cloze
    (lighteval's "MMLU (cloze)"): "Question: ..." and "Answer:" without the lettered options (+ the answer
    text for exemplars)."""
    if cloze:
        return f"Question: {rec.question}\nAnswer:" + (
            f" {rec.choices[rec.answer]}\n\n" if with_answer else ""
        )
    text = rec.question + "".join(f"\n{LETTERS[k]}. {c}" for k, c in enumerate(rec.choices)) + "\nAnswer:"
    return text + (f" {LETTERS[rec.answer]}\n\n" if with_answer else "")


def mmlu_prompt(rec: MMLURecord, dev: Sequence[MMLURecord], cloze: bool = False) -> str:
    subject = rec.subject.replace("_", " ")
    head = f"The following are {'questions' if cloze else 'multiple choice questions'} (with answers) about {subject}.\n\n"
    return (
        head
        + "".join(mmlu_format_example(d, True, cloze) for d in dev)
        + mmlu_format_example(rec, False, cloze)
    )


def _load_mmlu(
    data_dir: Path | None, source: Source, subjects: list[str] | None
) -> tuple[list[MMLURecord], dict[str, list[MMLURecord]]]:
    """Test records (all subjects pooled, in file order; local subjects sorted by name) and dev exemplars."""
    if source == "hub":
        datasets = _import_datasets()
        test = datasets.load_dataset("cais/mmlu", "all", split="test")
        dev = datasets.load_dataset("cais/mmlu", "all", split="dev")

        def conv(r: dict[str, Any]) -> MMLURecord:
            return MMLURecord(r["subject"], r["question"], tuple(r["choices"]), int(r["answer"]))

        test_recs = [conv(r) for r in test if subjects is None or r["subject"] in subjects]
        dev_by: dict[str, list[MMLURecord]] = {}
        for r in dev:
            dev_by.setdefault(r["subject"], []).append(conv(r))
        return test_recs, dev_by
    root = _require_dir(data_dir, "mmlu")
    names = subjects or sorted(p.name[: -len("_test.csv")] for p in (root / "test").glob("*_test.csv"))
    if not names:
        raise BenchmarkDataError(f"{root / 'test'}: no *_test.csv files")
    test_recs: list[MMLURecord] = []
    dev_by: dict[str, list[MMLURecord]] = {}
    for s in names:
        test_recs += read_mmlu_csv(root / "test" / f"{s}_test.csv", s)
        dev_by[s] = read_mmlu_csv(root / "dev" / f"{s}_dev.csv", s)
    return test_recs, dev_by


def mmlu_items(
    data_dir: Path | None,
    source: Source,
    subjects: list[str] | None,
    limit: int | None,
    seed: int,
    shots: int = MMLU_SHOTS,
    cloze: bool = False,
) -> list[MultipleChoiceItem]:
    """``cloze``: each choice's text is scored after "Answer:" (small models score near chance on the
    letters); else the letters " A".." D" after the lettered options (one forward for the four)."""
    test, dev_by = _load_mmlu(data_dir, source, subjects)
    items = []
    for i in select_indices(len(test), limit, seed):
        rec = test[i]
        dev = dev_by.get(rec.subject, [])[:shots]
        if len(dev) < shots:
            raise BenchmarkDataError(
                f"MMLU subject {rec.subject!r}: needs {shots} dev exemplars, has {len(dev)}"
            )
        ctx = mmlu_prompt(rec, dev, cloze)
        conts = tuple(f" {c}" for c in rec.choices) if cloze else tuple(f" {c}" for c in "ABCD")
        items.append(
            MultipleChoiceItem(f"mmlu/{rec.subject}/{i}", rec.subject, (ctx,) * 4, conts, rec.answer)
        )
    return items


# ----------------------------------------------------------------------------------------------- ARC


def arc_format(query: str, answer: str | None) -> str:
    """lm-eval's ARC format: "Question: ...\\nAnswer:" with the choice text as continuation."""
    q = query if query.startswith("Question:") else f"Question: {query}"
    return f"{q}\nAnswer:" + (f" {answer}" if answer is not None else "")


def _load_arc(
    data_dir: Path | None, source: Source, split: Literal["easy", "challenge"]
) -> list[dict[str, Any]]:
    if source == "hub":
        ds = _import_datasets().load_dataset(
            "allenai/ai2_arc", "ARC-Easy" if split == "easy" else "ARC-Challenge", split="test"
        )
        return [
            {
                "query": r["question"],
                "choices": list(r["choices"]["text"]),
                "gold": list(r["choices"]["label"]).index(r["answerKey"]),
            }
            for r in ds
        ]
    path = _require_dir(data_dir, "arc") / f"arc_{split}.jsonl"
    rows = read_jsonl(path)
    for k, r in enumerate(rows, 1):
        for key in ("query", "choices", "gold"):
            require_field(r, key, f"{path}:{k}")
        if not 0 <= r["gold"] < len(r["choices"]):
            raise BenchmarkDataError(
                f"{path}:{k}: field 'gold' {r['gold']} out of range for {len(r['choices'])} choices"
            )
    return rows


def arc_items(
    data_dir: Path | None, source: Source, split: Literal["easy", "challenge"], limit: int | None, seed: int
) -> list[MultipleChoiceItem]:
    rows = _load_arc(data_dir, source, split)
    items = []
    for i in select_indices(len(rows), limit, seed):
        ex = rows[_other_index(i, len(rows), seed)]
        ctx = arc_format(ex["query"], ex["choices"][ex["gold"]]) + "\n\n" + arc_format(rows[i]["query"], None)
        conts = tuple(f" {c}" for c in rows[i]["choices"])
        items.append(
            MultipleChoiceItem(
                f"arc_{split}/{i}", f"arc_{split}", (ctx,) * len(conts), conts, int(rows[i]["gold"])
            )
        )
    return items


# ----------------------------------------------------------------------------------------------- WinoGrande


def _load_winogrande(data_dir: Path | None, source: Source) -> list[dict[str, Any]]:
    if source == "hub":
        ds = _import_datasets().load_dataset("allenai/winogrande", "winogrande_xl", split="validation")
        rows = []
        for r in ds:
            cut = r["sentence"].index("_")
            prefix = r["sentence"][:cut]
            rows.append(
                {
                    "context_options": [prefix + r["option1"], prefix + r["option2"]],
                    "continuation": r["sentence"][cut + 1 :].strip(),
                    "gold": int(r["answer"]) - 1,
                }
            )
        return rows
    path = _require_dir(data_dir, "winogrande") / "winogrande.jsonl"
    rows = read_jsonl(path)
    for k, r in enumerate(rows, 1):
        if len(require_field(r, "context_options", f"{path}:{k}")) != 2:
            raise BenchmarkDataError(f"{path}:{k}: field 'context_options' must have 2 entries")
        require_field(r, "continuation", f"{path}:{k}")
        if require_field(r, "gold", f"{path}:{k}") not in (0, 1):
            raise BenchmarkDataError(f"{path}:{k}: field 'gold' must be 0 or 1")
    return rows


def winogrande_items(
    data_dir: Path | None, source: Source, limit: int | None, seed: int
) -> list[MultipleChoiceItem]:
    """Partial scoring: the shared continuation is scored after each option-filled context."""
    rows = _load_winogrande(data_dir, source)
    items = []
    for i in select_indices(len(rows), limit, seed):
        ex = rows[_other_index(i, len(rows), seed)]
        shot = f"{ex['context_options'][ex['gold']]} {ex['continuation']}\n\n"
        r = rows[i]
        ctxs = tuple(shot + c for c in r["context_options"])
        items.append(
            MultipleChoiceItem(
                f"winogrande/{i}", "winogrande", ctxs, (f" {r['continuation']}",) * 2, int(r["gold"])
            )
        )
    return items


# ----------------------------------------------------------------------------------------------- AGIEval


def _agieval_label(label: Any, where: str) -> str | None:
    """The single gold letter, or None for a multi-answer row (not scored)."""
    if isinstance(label, list):
        return label[0] if len(label) == 1 else None
    if isinstance(label, str) and len(label) == 1 and label in LETTERS:
        return label
    raise BenchmarkDataError(f"{where}: field 'label' must be a letter or list of letters, got {label!r}")


def agieval_demos(csv_path: Path, task: str) -> list[dict[str, Any]]:
    """Demonstrations of ``task`` from few_shot_prompts.csv (cells are Python dict literals, "sample k" rows)."""
    column = "sat-en" if task == "sat-en-without-passage" else task
    rows = _read_csv(csv_path)
    if not rows or column not in rows[0]:
        raise BenchmarkDataError(f"{csv_path}: no column {column!r} in the header")
    j = rows[0].index(column)
    demos = []
    for rowno, row in enumerate(rows[1:], 2):
        if row and row[0].startswith("sample") and j < len(row) and row[j].strip():
            try:
                d = ast.literal_eval(row[j])
            except (ValueError, SyntaxError) as e:
                raise BenchmarkDataError(
                    f"{csv_path} row {rowno}, column {column!r}: not a dict literal ({e})"
                ) from e
            if not isinstance(d, dict) or "question" not in d:
                raise BenchmarkDataError(
                    f"{csv_path} row {rowno}, column {column!r}: expected a dict with 'question'"
                )
            demos.append(d)
    if not demos:
        raise BenchmarkDataError(f"{csv_path}: column {column!r} has no demonstrations")
    return demos


def agieval_question(rec: dict[str, Any], number: int, chinese: bool, skip_passage: bool) -> str:
    """The official few-shot question block ("Problem k.   passage question\\nChoose from ...:    (A).. (B)..")."""
    passage = "" if skip_passage or rec.get("passage") is None else rec["passage"]
    options = " ".join(rec.get("options") or [])
    if chinese:
        return f"问题 {number}.   {passage} {rec['question']}\n从以下选项中选择:    {options}\n"
    return (
        f"Problem {number}.   {passage} {rec['question']}\nChoose from the following options:    {options}\n"
    )


def agieval_prompt(rec: dict[str, Any], demos: list[dict[str, Any]], task: str) -> str:
    """Official few-shot (no CoT) prompt, ending with the answer cue; the continuation is " X"."""
    chinese = task in AGIEVAL_CHINESE_MC
    skip = task == "sat-en-without-passage"
    head, cue = (
        ("以下是考试中各个问题的答案。\n", "答案是")
        if chinese
        else ("Here are the answers for the problems in the exam.\n", "The answer is therefore")
    )
    body = ""
    for k, d in enumerate(demos, 1):
        label = _agieval_label(d.get("label"), f"few_shot_prompts.csv {task} sample {k}")
        body += agieval_question(d, k, chinese, skip) + f"{cue} {label}\n" + "\n"
    return head + body + agieval_question(rec, len(demos) + 1, chinese, skip) + cue


def agieval_items(
    data_dir: Path | None, source: Source, tasks: Sequence[str], limit: int | None, seed: int
) -> list[MultipleChoiceItem]:
    if source == "hub":
        raise BenchmarkDataError(
            "AGIEval is read from local files only (agieval/v1/*.jsonl + few_shot_prompts.csv)"
        )
    root = _require_dir(data_dir, "agieval")
    pool: list[tuple[str, int, dict[str, Any], str]] = []
    demos_by: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        if task in AGIEVAL_UNSUPPORTED:
            raise BenchmarkDataError(f"AGIEval task {task!r} is not supported: {AGIEVAL_UNSUPPORTED[task]}")
        if task not in AGIEVAL_ENGLISH_MC + AGIEVAL_CHINESE_MC:
            raise BenchmarkDataError(f"unknown AGIEval task {task!r}")
        path = root / "v1" / f"{task}.jsonl"
        for k, r in enumerate(read_jsonl(path)):
            where = f"{path}:{k + 1}"
            label = _agieval_label(require_field(r, "label", where), where)
            if label is not None:
                if not require_field(r, "options", where) or LETTERS.index(label) >= len(r["options"]):
                    raise BenchmarkDataError(
                        f"{where}: field 'label' {label!r} not among {len(r['options'] or [])} options"
                    )
                pool.append((task, k, r, label))
        demos_by[task] = agieval_demos(root / "few_shot_prompts.csv", task)
    items = []
    for i in select_indices(len(pool), limit, seed):
        task, k, rec, label = pool[i]
        ctx = agieval_prompt(rec, demos_by[task], task)
        conts = tuple(f" {LETTERS[c]}" for c in range(len(rec["options"])))
        items.append(
            MultipleChoiceItem(f"agieval/{task}/{k}", task, (ctx,) * len(conts), conts, LETTERS.index(label))
        )
    return items
