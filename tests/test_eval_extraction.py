"""Answer extraction on the real formats: BBH CoT exemplars and targets, GSM8K solutions and exemplars."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from c2f_megatron.eval.benchmarks.reasoning import GSM8K_COT_EXEMPLARS, bbh_chance, bbh_cot_prompt
from c2f_megatron.eval.extraction import (
    bbh_exact_match,
    extract_bbh_answer,
    extract_gsm8k_answer,
    normalize_number,
    parse_gsm8k_gold,
)


def _bbh_tasks(data: Path) -> list[tuple[str, str, list[dict]]]:
    out = []
    for path in sorted((data / "bbh").glob("*.json")):
        prompt = (data / "bbh" / "cot-prompts" / f"{path.stem}.txt").read_text(encoding="utf-8")
        out.append((path.stem, prompt, json.loads(path.read_text(encoding="utf-8"))["examples"]))
    return out


def test_bbh_cot_exemplar_answers_extract_into_the_target_space(shared_data: Path):
    """Each exemplar's CoT, read as if generated, yields its stated answer, in the same space as the golds."""
    tasks = _bbh_tasks(shared_data)
    assert len(tasks) == 27
    for task, prompt, examples in tasks:
        body = bbh_cot_prompt(prompt)
        assert not body.startswith(("-----", "BENCHMARK DATA")) and "canary" not in body.lower()
        shots = body.split("\n\nQ: ")[1:]
        assert len(shots) == 3, task
        mc, _ = bbh_chance(task, examples[0]["input"])
        targets = {ex["target"] for ex in examples}
        for shot in shots:
            cot = shot.split("\nA: ", 1)[1]
            stated = re.findall(r"So the answer is (.*)\.$", cot)
            assert len(stated) == 1, (task, cot[-80:])
            pred = extract_bbh_answer(cot, multiple_choice=mc)
            assert pred == stated[0], task
            if mc:
                assert re.fullmatch(r"\([A-Z]\)", pred), (task, pred)
            elif len(targets) <= 2:  # Yes/No, True/False, valid/invalid, yes/no
                assert pred in targets, (task, pred, targets)


def test_every_bbh_target_round_trips(shared_data: Path):
    for task, _, examples in _bbh_tasks(shared_data):
        for ex in examples:
            mc, _ = bbh_chance(task, ex["input"])
            generated = f"Let's see. Step one.\nSo the answer is {ex['target']}."
            assert bbh_exact_match(extract_bbh_answer(generated, multiple_choice=mc), ex["target"]), (
                task,
                ex["target"],
            )


@pytest.mark.parametrize(
    ("text", "mc", "expected"),
    [
        ("... So the answer is (B).", True, "(B)"),
        ("So the answer is B.", True, "(B)"),
        ("So the answer is (C) Ambiguous.", True, "(C)"),
        ("so the answer is (D)\n\nQ: next", True, "(D)"),
        ("So the answer is ] } ].", False, "] } ]"),
        ("So the answer is -219.", False, "-219"),
        ("So the answer is arson aspect census.", False, "arson aspect census"),
        ("I cannot tell.", True, None),
    ],
)
def test_bbh_extraction_variants(text: str, mc: bool, expected: str | None):
    assert extract_bbh_answer(text, multiple_choice=mc) == expected


def test_bbh_exact_match_is_exact():
    assert bbh_exact_match("(A)", "(A)") and bbh_exact_match(" Yes ", "Yes")
    assert (
        not bbh_exact_match("(A)", "(B)")
        and not bbh_exact_match("yes", "Yes")
        and not bbh_exact_match(None, "(A)")
    )


def test_gsm8k_gold_parsing_on_the_test_set(shared_data: Path):
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    golds = [parse_gsm8k_gold(r["answer"]) for r in rows]
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", g) for g in golds)
    raw = {r["answer"].rsplit("####", 1)[1].strip(): g for r, g in zip(rows, golds)}
    assert raw["2,125"] == "2125" and raw["1,450,000"] == "1450000"
    # The worked solutions themselves end with the number: the last-number fallback must recover it.
    assert [extract_gsm8k_answer(r["answer"]) for r in rows] == golds
    with pytest.raises(ValueError, match="####"):
        parse_gsm8k_gold("no final line")


def test_gsm8k_extraction_on_exemplars_and_variants():
    for _, answer in GSM8K_COT_EXEMPLARS:
        stated = re.search(r"The answer is (\d+)\.$", answer).group(1)
        # "The answer is N" wins over the later/earlier numbers of the chain of thought.
        assert extract_gsm8k_answer(answer + " Then 5 + 5 = 10.") == stated
    assert extract_gsm8k_answer("She pays 3 * 6 = $18.00 in total. The answer is $18.00.") == "18"
    assert extract_gsm8k_answer("The answer is 1,000 apples.") == "1000"
    assert extract_gsm8k_answer("the answer is: -4") == "-4"
    assert extract_gsm8k_answer("So it costs 0.50 dollars each.") == "0.5"
    assert extract_gsm8k_answer("I don't know.") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", "1000"),
        ("$18.00", "18"),
        ("18.50", "18.5"),
        ("-3", "-3"),
        ("5.", "5"),
        (".5", "0.5"),
        ("abc", None),
        ("1.2.3", None),
    ],
)
def test_normalize_number(text: str, expected: str | None):
    assert normalize_number(text) == expected
