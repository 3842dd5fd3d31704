"""Answer extraction from free-form generations (BBH chain-of-thought, GSM8K) and gold parsing.

Exact match is only as good as the extraction in front of it, so the rules are written once here, follow the
formats the few-shot prompts teach ("So the answer is X." for BBH, "The answer is N." for GSM8K), and are
tested on the real data files.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# BBH CoT prompts end every exemplar with "So the answer is X." ; the first such sentence is the answer.
_BBH_ANSWER = re.compile(r"the answer is\s*(.*)", re.IGNORECASE)
# A multiple-choice answer written as "(B)", "(B) some text", "B", "B." or "B)".
_MC_LETTER = re.compile(r"^\(?([A-Z])\)?(?=$|[\s.,:;])")
_GSM8K_ANSWER = re.compile(r"the answer is\s*:?\s*(-?\$?\s*-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\$?\s*-?\d[\d,]*(?:\.\d+)?|-?\$?\s*-?\.\d+")


def normalize_number(text: str) -> str | None:
    """Canonical decimal string for a number as written ("$1,000.00" -> "1000", "-0.50" -> "-0.5").

    Returns None when ``text`` is not a number, so callers can treat it as a wrong answer.
    """
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    s = s.rstrip(".")
    if s.count("-") > 1:
        return None
    if not s or not re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s):
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def parse_gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K solution, i.e. what follows the final "####", normalised."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer[-80:]!r}")
    number = normalize_number(answer.rsplit("####", 1)[1])
    if number is None:
        raise ValueError(f"GSM8K gold after '####' is not a number: {answer.rsplit('####', 1)[1]!r}")
    return number


def extract_gsm8k_answer(generation: str) -> str | None:
    """The model's final number: the first "The answer is N", else the last number in the text."""
    match = _GSM8K_ANSWER.search(generation)
    if match:
        number = normalize_number(match.group(1))
        if number is not None:
            return number
    for candidate in reversed(_NUMBER.findall(generation)):
        number = normalize_number(candidate)
        if number is not None:
            return number
    return None


def extract_bbh_answer(generation: str, multiple_choice: bool = False) -> str | None:
    """The text after the first "So the answer is", up to the line end, without the closing period.

    With ``multiple_choice`` the answer is reduced to its option label "(X)", accepting "(X) text", "X" or
    "X." as written by the model. Returns None when the generation states no answer.
    """
    match = _BBH_ANSWER.search(generation)
    if not match:
        return None
    answer = match.group(1).split("\n", 1)[0].strip()
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    if multiple_choice:
        letter = _MC_LETTER.match(answer)
        if letter:
            return f"({letter.group(1)})"
    return answer or None


def bbh_exact_match(prediction: str | None, target: str) -> bool:
    """Exact match after whitespace stripping; a missing prediction is wrong."""
    return prediction is not None and prediction.strip() == target.strip()
