"""General benchmarks in their standard few-shot formats, scored through the ``LanguageModel`` protocol.

Multiple choice (MMLU 5-shot, ARC-Easy/Challenge 1-shot, WinoGrande 1-shot, AGIEval few-shot) is scored by
the argmax of summed log-likelihoods over the choices (optionally divided by the continuation's character
length, "acc_norm"); ties go to the first choice. Generation benchmarks (BBH 3-shot CoT, GSM8K 8-shot CoT)
are scored by exact match after ``extraction``. Records come from the local ``shared/data`` files (formats in
its README) or, with ``source="hub"``, from Hugging Face ``datasets`` names.

Selection: ``limit`` items are drawn uniformly without replacement over the whole benchmark (all subtasks
pooled) with ``random.Random(seed)``, then kept in file order (``select_indices``). The reported value is the
micro-average over evaluated items; ``subtasks`` and ``macro`` give the per-subtask view.

Few-shot sources: MMLU uses the 5 dev rows of the subject; ARC and WinoGrande (no train split here) use one
other item of the same file, drawn per item from ``(seed, index)``; AGIEval uses every demonstration of the
task in few_shot_prompts.csv in the official "few-shot" (no CoT) format, without the official 2048-token
truncation; BBH uses the official 3-shot CoT prompt; GSM8K the 8 Wei et al. exemplars below.

Not supported: AGIEval cloze tasks (math, gaokao-mathcloze) and multi-answer tasks (jec-qa-ca, jec-qa-kd;
multi-answer rows of gaokao-physics are skipped); AGIEval from the hub; BBH prompts from the hub (the CoT
prompt files are always read locally); HellaSwag/RACE (no data).
"""

from __future__ import annotations

import ast
import csv
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from c2f_megatron.eval.extraction import (
    bbh_exact_match,
    extract_bbh_answer,
    extract_gsm8k_answer,
    parse_gsm8k_gold,
)
from c2f_megatron.eval.protocol import LanguageModel

Source = Literal["local", "hub"]

MMLU_SHOTS = 5
BBH_MAX_NEW_TOKENS = 512
GSM8K_MAX_NEW_TOKENS = 256
BBH_STOP = ["\n\nQ:", "\n\n"]
GSM8K_STOP = ["\n\nQuestion:", "Question:", "\n\n"]

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

BBH_BINARY_TASKS = frozenset(
    {
        "boolean_expressions",
        "causal_judgement",
        "formal_fallacies",
        "navigate",
        "sports_understanding",
        "web_of_lies",
    }
)

# Wei et al. (2022), "Chain-of-Thought Prompting Elicits Reasoning in Large Language Models", Table 20: the
# eight math word problem exemplars used for GSM8K. The GSM8K train split is not in shared/data, so these
# standard exemplars are the few-shot context ("Question: ...\nAnswer: ... The answer is N.").
GSM8K_COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
        "done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
        "have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
        "total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
        "eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
        "lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
        "20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
        "have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
        "5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from "
        "monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
        "computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How "
        "many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing "
        "2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
        "dollars left. 23 - 15 is 8. The answer is 8.",
    ),
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

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


class BenchmarkDataError(ValueError):
    """A benchmark file is missing or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: choice i is scored as log p(continuations[i] | contexts[i])."""

    item_id: str
    subtask: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class GenerationItem:
    """One question answered by greedy generation and compared to ``target`` after extraction."""

    item_id: str
    subtask: str
    prompt: str
    target: str
    kind: Literal["bbh", "bbh_mc", "gsm8k"]
    chance: float


@dataclass(frozen=True)
class ItemOutcome:
    item_id: str
    subtask: str
    gold: str
    prediction: str
    correct: bool
    chance: float


@dataclass(frozen=True)
class BenchmarkResult:
    """``value`` is the micro-average of ``metric``; ``chance`` the same average for uniform guessing;
    ``categories``: micro-averages per category of subtasks (MMLU's four), empty elsewhere."""

    name: str
    metric: str
    value: float
    n: int
    chance: float
    macro: float
    subtasks: dict[str, float]
    outcomes: tuple[ItemOutcome, ...]
    categories: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- selection


def select_indices(n_total: int, limit: int | None, seed: int) -> list[int]:
    """Indices of the evaluated items: all of them, or ``limit`` drawn with ``Random(seed)``, in file order."""
    if limit is None or limit >= n_total:
        return list(range(n_total))
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return sorted(random.Random(seed).sample(range(n_total), limit))


def _other_index(i: int, n: int, seed: int) -> int:
    """A deterministic exemplar index != i, for benchmarks whose few-shot examples come from the same file."""
    if n < 2:
        raise BenchmarkDataError("a 1-shot benchmark needs at least 2 records to draw an exemplar")
    j = random.Random(f"{seed}:{i}").randrange(n - 1)
    return j + 1 if j >= i else j


# ----------------------------------------------------------------------------------------------- file I/O


def read_jsonl(path: Path, error: type[ValueError] = BenchmarkDataError) -> list[dict[str, Any]]:
    """All records of a JSON Lines file; a missing file or a bad line raises ``error`` naming file:line."""
    if not path.is_file():
        raise error(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{lineno}: invalid JSON ({e})") from e
    return rows


def require_field(
    row: dict[str, Any], key: str, where: str, error: type[ValueError] = BenchmarkDataError
) -> Any:
    """``row[key]``, or ``error`` naming the record (``where``) and the missing field."""
    if key not in row:
        raise error(f"{where}: missing field {key!r}")
    return row[key]


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
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: file not found")
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        for rowno, row in enumerate(csv.reader(f), 1):
            if rowno == 1 and row and row[0] == "question" and row[-1] == "answer":
                continue
            where = f"{path} row {rowno}"
            if len(row) != 6:
                raise BenchmarkDataError(
                    f"{where}: expected 6 fields (question,A,B,C,D,answer), got {len(row)}"
                )
            out.append(
                MMLURecord(
                    subject, row[0], (row[1], row[2], row[3], row[4]), _parse_mmlu_answer(row[5], where)
                )
            )
    return out


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
    if not csv_path.is_file():
        raise BenchmarkDataError(f"{csv_path}: file not found")
    column = "sat-en" if task == "sat-en-without-passage" else task
    with csv_path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
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


# ----------------------------------------------------------------------------------------------- BBH


def bbh_cot_prompt(text: str) -> str:
    """The official CoT prompt without its canary line (and the "-----" separator that follows it)."""
    lines = text.split("\n")
    if lines and "canary" in lines[0].lower():
        lines = lines[1:]
    if lines and lines[0].strip() == "-----":
        lines = lines[1:]
    return "\n".join(lines).strip()


def bbh_question(cot_prompt: str, question: str) -> str:
    return f"{cot_prompt}\n\nQ: {question}\nA: Let's think step by step."


def bbh_chance(task: str, question: str) -> tuple[bool, float]:
    """(is multiple choice with lettered options, chance of a uniform guess over the answer set)."""
    n_options = len(re.findall(r"^\([A-Z]\)", question, re.MULTILINE))
    if n_options:
        return True, 1.0 / n_options
    if task in BBH_BINARY_TASKS:
        return False, 0.5
    return False, 0.0


def bbh_tasks(data_dir: Path | None) -> list[str]:
    root = _require_dir(data_dir, "bbh")
    names = sorted(p.stem for p in root.glob("*.json"))
    if not names:
        raise BenchmarkDataError(f"{root}: no <task>.json files")
    return names


def bbh_items(
    data_dir: Path | None, source: Source, tasks: Sequence[str], limit: int | None, seed: int
) -> list[GenerationItem]:
    root = _require_dir(data_dir, "bbh")  # the CoT prompts are only available as files
    pool: list[tuple[str, int, dict[str, Any]]] = []
    prompts = {}
    for task in tasks:
        cot = root / "cot-prompts" / f"{task}.txt"
        if not cot.is_file():
            raise BenchmarkDataError(f"{cot}: CoT prompt file not found")
        prompts[task] = bbh_cot_prompt(cot.read_text(encoding="utf-8"))
        if source == "hub":
            examples = list(_import_datasets().load_dataset("lukaemon/bbh", task, split="test"))
        else:
            path = root / f"{task}.json"
            if not path.is_file():
                raise BenchmarkDataError(f"{path}: file not found")
            examples = require_field(json.loads(path.read_text(encoding="utf-8")), "examples", str(path))
        for k, ex in enumerate(examples):
            require_field(ex, "input", f"{task}.json examples[{k}]")
            require_field(ex, "target", f"{task}.json examples[{k}]")
            pool.append((task, k, ex))
    items = []
    for i in select_indices(len(pool), limit, seed):
        task, k, ex = pool[i]
        mc, chance = bbh_chance(task, ex["input"])
        items.append(
            GenerationItem(
                f"bbh/{task}/{k}",
                task,
                bbh_question(prompts[task], ex["input"]),
                ex["target"].strip(),
                "bbh_mc" if mc else "bbh",
                chance,
            )
        )
    return items


# ----------------------------------------------------------------------------------------------- GSM8K


def gsm8k_prompt(question: str) -> str:
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in GSM8K_COT_EXEMPLARS)
    return f"{shots}Question: {question}\nAnswer:"


def gsm8k_items(data_dir: Path | None, source: Source, limit: int | None, seed: int) -> list[GenerationItem]:
    if source == "hub":
        rows = list(_import_datasets().load_dataset("gsm8k", "main", split="test"))
        where = "gsm8k (hub) test"
    else:
        path = _require_dir(data_dir, "gsm8k") / "test.jsonl"
        rows, where = read_jsonl(path), str(path)
    items = []
    for i in select_indices(len(rows), limit, seed):
        q = require_field(rows[i], "question", f"{where}:{i + 1}")
        try:
            gold = parse_gsm8k_gold(require_field(rows[i], "answer", f"{where}:{i + 1}"))
        except ValueError as e:
            raise BenchmarkDataError(f"{where}:{i + 1}: field 'answer': {e}") from e
        items.append(GenerationItem(f"gsm8k/{i}", "gsm8k", gsm8k_prompt(q), gold, "gsm8k", 0.0))
    return items


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


# ----------------------------------------------------------------------------------------------- entry point

BENCHMARKS = ("mmlu", "arc_easy", "arc_challenge", "winogrande", "agieval", "bbh", "gsm8k")


def evaluate_benchmark(
    name: str,
    model: LanguageModel,
    limit: int | None = None,
    seed: int = 0,
    *,
    data_dir: Path | str | None = None,
    source: Source = "local",
    length_normalized: bool = False,
    batch_size: int = 32,
    mmlu_shots: int = MMLU_SHOTS,
    mmlu_cloze: bool = False,
    max_new_tokens: int | None = None,
) -> BenchmarkResult:
    """Evaluate one benchmark; ``name`` is one of ``BENCHMARKS`` or "mmlu:<subject>", "agieval:<task>",
    "bbh:<task>" (comma-separated subtasks allowed) to restrict it. MMLU reports its categories too.
    ``max_new_tokens`` caps BBH's and GSM8K's generations below their standard 512 / 256 (a budget)."""
    base, _, sub = name.partition(":")
    subtasks = [s for s in sub.split(",") if s] or None
    ddir = Path(data_dir) if data_dir is not None else None
    if base not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)} (optionally ':subtask')"
        )
    if subtasks and base not in ("mmlu", "agieval", "bbh"):
        raise ValueError(f"benchmark {base!r} has no subtasks (got {name!r})")
    metric = "acc_norm" if length_normalized else "acc"
    if base == "mmlu":
        mc = mmlu_items(ddir, source, subtasks, limit, seed, mmlu_shots, mmlu_cloze)
        outcomes = score_multiple_choice(mc, model, length_normalized, batch_size)
        return summarize(name, metric, outcomes, MMLU_CATEGORY_OF)
    elif base in ("arc_easy", "arc_challenge"):
        mc = arc_items(ddir, source, "easy" if base == "arc_easy" else "challenge", limit, seed)
    elif base == "winogrande":
        mc = winogrande_items(ddir, source, limit, seed)
    elif base == "agieval":
        mc = agieval_items(ddir, source, subtasks or list(AGIEVAL_DEFAULT), limit, seed)
    elif base == "bbh":
        items = bbh_items(ddir, source, subtasks or bbh_tasks(ddir), limit, seed)
        new = min(BBH_MAX_NEW_TOKENS, max_new_tokens or BBH_MAX_NEW_TOKENS)
        return summarize(name, "exact_match", score_generation(items, model, new, BBH_STOP, batch_size))
    else:
        items = gsm8k_items(ddir, source, limit, seed)
        new = min(GSM8K_MAX_NEW_TOKENS, max_new_tokens or GSM8K_MAX_NEW_TOKENS)
        return summarize(name, "exact_match", score_generation(items, model, new, GSM8K_STOP, batch_size))
    return summarize(name, metric, score_multiple_choice(mc, model, length_normalized, batch_size))


def _require_dir(data_dir: Path | None, sub: str) -> Path:
    if data_dir is None:
        raise BenchmarkDataError(
            f"data_dir is required to read {sub}/ from local files (e.g. ../shared/data)"
        )
    path = Path(data_dir) / sub
    if not path.is_dir():
        raise BenchmarkDataError(f"{path}: directory not found")
    return path


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BenchmarkDataError("source='hub' needs the 'datasets' package") from e
    return datasets
