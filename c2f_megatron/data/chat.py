"""How a model sees a dialogue: one ``ChatFormat`` per (prompt format, tokenizer), used by every stage.

SFT, the reward model, the RL prompt stream, evaluation and MT-Bench all turn HH-RLHF dialogues (or judge
questions) into the text and ids of one format, so a model is trained, rewarded and evaluated on exactly
the prompts it will be asked:

- ``hh``: the HH-RLHF text itself (``"\\n\\nHuman: ...\\n\\nAssistant:"``), response after one space;
- ``mistral-instruct``: ``"[INST] ... [/INST]"`` (mistral-common v1), response after one space, multi-turn
  prompts hold ``"</s>"`` (parsed into the EOS id);
- ``chat-template``: the tokenizer's own Jinja chat template (ChatML for SmolLM2, Llama-3's for Llama-3),
  the system prompt as a system message, response right after the generation prompt, special tokens of
  the rendered text parsed into their ids.

BOS follows the tokenizer's convention for the two plain-text formats (sentencepiece Mistral prepends
``<s>``); a chat template writes whatever start token it wants itself, so none is added to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from c2f_megatron.data.templates import (
    HH_USER,
    INST_OPEN,
    PromptFormat,
    Turn,
    apply_system_prompt,
    merge_consecutive_turns,
    parse_hh,
    render_prompt,
    strip_stop_ids,
)
from c2f_megatron.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class ChatFormat:
    """Rendering and tokenisation of prompts and responses in one format for one tokenizer."""

    fmt: PromptFormat
    tokenizer: Tokenizer

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", PromptFormat(self.fmt))
        if self.fmt is PromptFormat.CHAT_TEMPLATE and self.tokenizer.chat_template is None:
            raise ValueError(
                f"prompt_format 'chat-template' needs a tokenizer with a chat template; "
                f"{self.tokenizer.name!r} has none (use 'hh' or 'mistral-instruct')"
            )

    @property
    def separator(self) -> str:
        """The text between a prompt and its response."""
        return "" if self.fmt is PromptFormat.CHAT_TEMPLATE else " "

    @property
    def parse_special(self) -> bool:
        """Special-token strings in rendered prompts are tokens (``</s>`` between Mistral turns,
        ``<|im_start|>`` in ChatML); in HH text they are text."""
        return self.fmt is not PromptFormat.HH

    @property
    def stop_strings(self) -> list[str]:
        """Text that starts a new turn, where a decoded generation is cut. A chat template's turn markers
        are special tokens (dropped by ``decode``): they end a generation as ids (EOS, stop ids) instead."""
        if self.fmt is PromptFormat.HH:
            return [HH_USER]
        if self.fmt is PromptFormat.MISTRAL_INSTRUCT:
            return [INST_OPEN]
        return []

    def render(self, turns: Sequence[Turn], system_prompt: str | None = None) -> str:
        """A prompt (ending where the assistant speaks next) for dialogue ``turns``."""
        if self.fmt is not PromptFormat.CHAT_TEMPLATE:
            return render_prompt(turns, self.fmt, system_prompt)
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages += [{"role": role, "content": text} for role, text in turns]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def from_hh(self, hh_prompt: str, system_prompt: str | None = None) -> str:
        """An HH-RLHF prompt in this format. HH text stays as it is (the system prompt goes into the first
        Human turn); the other formats merge consecutive same-role turns, which they cannot express."""
        if self.fmt is PromptFormat.HH:
            return apply_system_prompt(hh_prompt, system_prompt, self.fmt)
        return self.render(merge_consecutive_turns(parse_hh(hh_prompt)), system_prompt)

    @property
    def bos_id(self) -> int | None:
        """The id a sequence starts with in this format, or None."""
        if self.tokenizer.adds_bos and self.fmt is not PromptFormat.CHAT_TEMPLATE:
            return self.tokenizer.bos_id
        return None

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a rendered prompt, with BOS where the tokenizer's convention wants one."""
        ids = self.tokenizer.encode(text, parse_special=self.parse_special)
        return ids if self.bos_id is None else [self.bos_id, *ids]

    def encode_pair(self, text: str, response: str) -> tuple[list[int], list[int]]:
        """``(prompt ids, response ids)`` of a rendered prompt and its response (no BOS, no EOS): the
        concatenation tokenizes like the text the model sees."""
        return self.tokenizer.encode_pair(text, response, self.separator, self.parse_special)


def encode_prompts(
    chat: ChatFormat,
    texts: Iterable[str],
    stop_ids: Iterable[int],
    max_length: int,
    overlong: Literal["truncate", "drop"] = "truncate",
) -> list[tuple[str, list[int]]]:
    """``(text, ids)`` of rendered prompts to generate from: trailing stop ids stripped (a prompt must not
    end in EOS), and prompts over ``max_length`` ids cut to their last ``max_length`` (``truncate``) or left
    out (``drop``); empty ones are left out."""
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    stops = list(stop_ids)
    out = []
    for text in texts:
        ids = strip_stop_ids(chat.encode_prompt(text), stops)
        if len(ids) > max_length:
            if overlong == "drop":
                continue
            ids = ids[-max_length:]
        if ids:
            out.append((text, ids))
    return out


def last_user_turn(prompt: str) -> str:
    """The last user message of a rendered prompt (ChatML, also decoded without its special tokens,
    Mistral ``[INST]`` or HH text), for display."""
    markers = (
        ("<|im_start|>user\n", "<|im_end|>"),
        ("[INST]", "[/INST]"),
        ("Human:", "Assistant:"),
        ("\nuser\n", "\nassistant"),
    )
    for start, end in markers:
        if start in prompt:
            return prompt.rsplit(start, 1)[1].split(end, 1)[0].strip()
    return prompt.strip()
