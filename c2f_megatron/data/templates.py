"""Prompt formats (Anthropic HH dialogue and Mistral instruct), the coarse-actor system prompt, stop handling.

Prompts are rendered as text; BOS is left to the tokenizer (``encode(..., add_bos=True)``) so it is added
exactly once. Multi-turn Mistral prompts contain ``"</s>"`` after each assistant turn and must be encoded
with ``parse_special=True`` to turn that into the EOS id, as mistral-common does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Literal

Role = Literal["user", "assistant"]
Turn = tuple[Role, str]

HH_USER = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
INST_OPEN = "[INST]"
INST_CLOSE = "[/INST]"
MISTRAL_EOS_TEXT = "</s>"

# Our wording of the Mistral-C2F coarse-actor instruction: ask for a long, reasoned first draft that the
# fine actor later refines. Configurable: callers pass any string to apply_system_prompt / prompts_for_rl.
COARSE_ACTOR_SYSTEM_PROMPT = (
    "Please answer the following request in detail and analytically: think it through step by step, "
    "explain your reasoning, consider the relevant aspects, and give a complete, well-organised answer."
)

_HH_SPLIT = re.compile(r"\n\n(Human|Assistant):")


class PromptFormat(str, Enum):
    """How a dialogue is written as text. A str enum so YAML configs can hold the plain string.

    ``chat-template`` is the tokenizer's own template; ``data.chat.ChatFormat`` renders it.
    """

    HH = "hh"
    MISTRAL_INSTRUCT = "mistral-instruct"
    CHAT_TEMPLATE = "chat-template"

    def __str__(self) -> str:
        return self.value


def _check_prompt_turns(turns: Sequence[Turn]) -> None:
    if not turns:
        raise ValueError("a prompt needs at least one turn")
    for role, _ in turns:
        if role not in ("user", "assistant"):
            raise ValueError(f"unknown role {role!r}; expected 'user' or 'assistant'")
    if turns[-1][0] != "user":
        raise ValueError("a prompt must end with a user turn (the assistant answers next)")


def render_hh(turns: Sequence[Turn]) -> str:
    """``"\\n\\nHuman: u1\\n\\nAssistant: a1 ... \\n\\nHuman: uN\\n\\nAssistant:"`` (no trailing space).

    The response then follows after one space, as in the HH-RLHF files.
    """
    _check_prompt_turns(turns)
    parts = [f"{HH_USER if role == 'user' else HH_ASSISTANT} {text}" for role, text in turns]
    return "".join(parts) + HH_ASSISTANT


def parse_hh(text: str) -> list[Turn]:
    """Turns of an HH dialogue or prompt; a final empty ``"\\n\\nAssistant:"`` (the prompt's end) is dropped.

    Turn text is stripped of surrounding whitespace. Raises ``ValueError`` if the text does not start with a
    role marker.
    """
    pieces = _HH_SPLIT.split(text)
    if pieces[0].strip():
        raise ValueError(f"HH text must start with {HH_USER!r} or {HH_ASSISTANT!r}: {text[:60]!r}")
    turns: list[Turn] = [
        ("user" if marker == "Human" else "assistant", body.strip())
        for marker, body in zip(pieces[1::2], pieces[2::2], strict=True)
    ]
    if turns and turns[-1] == ("assistant", ""):
        turns.pop()
    return turns


def merge_consecutive_turns(turns: Sequence[Turn], sep: str = "\n\n") -> list[Turn]:
    """Join adjacent turns of the same role; Mistral instruct needs strict user/assistant alternation and a
    few HH prompts have two Human turns in a row."""
    merged: list[Turn] = []
    for role, text in turns:
        if merged and merged[-1][0] == role:
            merged[-1] = (role, merged[-1][1] + sep + text)
        else:
            merged.append((role, text))
    return merged


def render_mistral_instruct(turns: Sequence[Turn], system_prompt: str | None = None) -> str:
    """``"[INST] u1 [/INST] a1</s>[INST] u2 [/INST]"`` without BOS (mistral-common v1 layout).

    As in mistral-common's v1 instruct tokenizer, a system prompt is prepended to the first user message
    followed by a blank line. Turns must alternate starting with the user.
    """
    _check_prompt_turns(turns)
    out: list[str] = []
    for i, (role, text) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"Mistral instruct turns must alternate user/assistant; turn {i} is {role!r}")
        if role == "user":
            if i == 0 and system_prompt:
                text = f"{system_prompt}\n\n{text}"
            out.append(f"{INST_OPEN} {text} {INST_CLOSE}")
        else:
            out.append(f" {text}{MISTRAL_EOS_TEXT}")
    return "".join(out)


def render_prompt(turns: Sequence[Turn], fmt: PromptFormat | str, system_prompt: str | None = None) -> str:
    """Render ``turns`` in ``fmt``, with an optional system prompt on the first user turn."""
    fmt = PromptFormat(fmt)
    if fmt is PromptFormat.CHAT_TEMPLATE:
        raise ValueError("the 'chat-template' format is rendered by the tokenizer (data.chat.ChatFormat)")
    if fmt is PromptFormat.MISTRAL_INSTRUCT:
        return render_mistral_instruct(turns, system_prompt)
    prompt = render_hh(turns)
    return apply_system_prompt(prompt, system_prompt, fmt) if system_prompt else prompt


def apply_system_prompt(
    prompt: str,
    system_prompt: str | None,
    fmt: PromptFormat | str,
    position: Literal["first", "last"] = "first",
) -> str:
    """Insert ``system_prompt + "\\n\\n"`` at the start of the first (or last) user message of a prompt.

    Neither format has a system role; ``"first"`` follows mistral-common's v1 tokenizer (the one Mistral-7B
    v0.1 was trained with), ``"last"`` puts the instruction right before the question being answered.
    An empty or ``None`` system prompt returns ``prompt`` unchanged.
    """
    if not system_prompt:
        return prompt
    marker = f"{HH_USER} " if PromptFormat(fmt) is PromptFormat.HH else f"{INST_OPEN} "
    at = prompt.find(marker) if position == "first" else prompt.rfind(marker)
    if at < 0:
        raise ValueError(f"no user turn ({marker!r}) in {fmt} prompt: {prompt[:60]!r}")
    at += len(marker)
    return f"{prompt[:at]}{system_prompt}\n\n{prompt[at:]}"


def strip_stop_tokens(text: str, stop_strings: Iterable[str]) -> str:
    """Remove stop strings (e.g. ``"</s>"``) repeated at the end of ``text``; earlier occurrences stay,
    since a multi-turn Mistral prompt legitimately contains ``"</s>"`` between turns."""
    stops = [s for s in stop_strings if s]
    changed = True
    while changed:
        changed = False
        for stop in stops:
            if text.endswith(stop):
                text = text[: -len(stop)]
                changed = True
    return text


def truncate_at_stop(text: str, stop_strings: Iterable[str]) -> str:
    """Cut generated text at the first stop string (e.g. ``"\\n\\nHuman:"`` for HH rollouts)."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]


def strip_stop_ids(ids: Sequence[int], stop_ids: Iterable[int]) -> list[int]:
    """Remove trailing ids that are in ``stop_ids`` (EOS, padding) from a prompt's ids."""
    stops = set(stop_ids)
    end = len(ids)
    while end and ids[end - 1] in stops:
        end -= 1
    return list(ids[:end])
