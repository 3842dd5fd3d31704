"""Generation benchmarks scored by exact match after answer extraction: BBH (3-shot chain of thought) and
GSM8K (8-shot chain of thought)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from c2f_megatron.eval.benchmarks.items import (
    BenchmarkDataError,
    GenerationItem,
    Source,
    _import_datasets,
    _require_dir,
    read_json,
    read_jsonl,
    read_text,
    require_field,
    select_indices,
)
from c2f_megatron.eval.extraction import parse_gsm8k_gold

BBH_MAX_NEW_TOKENS = 512
GSM8K_MAX_NEW_TOKENS = 256
BBH_STOP = ["\n\nQ:", "\n\n"]
GSM8K_STOP = ["\n\nQuestion:", "Question:", "\n\n"]


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
        prompts[task] = bbh_cot_prompt(read_text(cot))
        if source == "hub":
            examples = list(_import_datasets().load_dataset("lukaemon/bbh", task, split="test"))
        else:
            path = root / f"{task}.json"
            if not path.is_file():
                raise BenchmarkDataError(f"{path}: file not found")
            examples = require_field(read_json(path), "examples", str(path))
            if not isinstance(examples, list) or not examples:
                raise BenchmarkDataError(f"{path}: field 'examples' must be a non-empty list")
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
