"""Prompt formats: exact strings, parsing, system prompts, stop handling, and mistral-common id parity."""

from __future__ import annotations

import pytest

from c2f_megatron.data.templates import (
    COARSE_ACTOR_SYSTEM_PROMPT,
    PromptFormat,
    Turn,
    apply_system_prompt,
    merge_consecutive_turns,
    parse_hh,
    render_hh,
    render_mistral_instruct,
    render_prompt,
    strip_stop_ids,
    strip_stop_tokens,
    truncate_at_stop,
)

TURNS: list[Turn] = [("user", "Hi there"), ("assistant", "Hello! How can I help?"), ("user", "What is 2+2?")]
HH = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant:"
MISTRAL = "[INST] Hi there [/INST] Hello! How can I help?</s>[INST] What is 2+2? [/INST]"


def test_prompt_format_enum() -> None:
    assert PromptFormat("hh") is PromptFormat.HH
    assert PromptFormat("mistral-instruct") is PromptFormat.MISTRAL_INSTRUCT
    assert PromptFormat.HH == "hh"
    assert str(PromptFormat.MISTRAL_INSTRUCT) == f"{PromptFormat.MISTRAL_INSTRUCT}" == "mistral-instruct"
    with pytest.raises(ValueError):
        PromptFormat("chatml")


def test_render_hh_exact() -> None:
    assert render_hh(TURNS) == HH
    assert render_hh([("user", "hi")]) == "\n\nHuman: hi\n\nAssistant:"
    assert render_prompt(TURNS, "hh") == HH


def test_render_hh_rejects_bad_turns() -> None:
    with pytest.raises(ValueError, match="end with a user turn"):
        render_hh([("user", "a"), ("assistant", "b")])
    with pytest.raises(ValueError, match="unknown role"):
        render_hh([("system", "a")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one turn"):
        render_hh([])


def test_parse_hh() -> None:
    assert parse_hh(HH) == TURNS
    assert parse_hh(HH + " 4") == [*TURNS, ("assistant", "4")]
    assert parse_hh("\n\nHuman:  padded  \n\nAssistant:") == [("user", "padded")]
    with pytest.raises(ValueError, match="must start with"):
        parse_hh("Human: no leading blank line")


def test_render_mistral_instruct_exact() -> None:
    assert render_mistral_instruct(TURNS) == MISTRAL
    assert render_prompt(TURNS, PromptFormat.MISTRAL_INSTRUCT) == MISTRAL
    assert render_mistral_instruct(TURNS, system_prompt="Be brief.") == (
        "[INST] Be brief.\n\nHi there [/INST] Hello! How can I help?</s>[INST] What is 2+2? [/INST]"
    )
    with pytest.raises(ValueError, match="alternate"):
        render_mistral_instruct([("user", "a"), ("user", "b")])


def test_mistral_instruct_ids_match_mistral_common() -> None:
    """Our text template + tokenizer (BOS added, "</s>" parsed) gives mistral-common's v1 chat ids."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from c2f_megatron.data.tokenizer import load_tokenizer

    request = ChatCompletionRequest(
        messages=[
            SystemMessage(content="Be brief."),
            UserMessage(content=TURNS[0][1]),
            AssistantMessage(content=TURNS[1][1]),
            UserMessage(content=TURNS[2][1]),
        ]
    )
    expected = MistralTokenizer.v1().encode_chat_completion(request).tokens
    text = render_mistral_instruct(TURNS, system_prompt="Be brief.")
    assert load_tokenizer().encode(text, add_bos=True, parse_special=True) == expected


def test_apply_system_prompt() -> None:
    sp = "Think step by step."
    assert apply_system_prompt(HH, sp, "hh") == HH.replace("Human: Hi", f"Human: {sp}\n\nHi")
    assert apply_system_prompt(HH, sp, "hh", position="last") == HH.replace(
        "Human: What", f"Human: {sp}\n\nWhat"
    )
    assert apply_system_prompt(MISTRAL, sp, "mistral-instruct") == render_mistral_instruct(TURNS, sp)
    assert apply_system_prompt(MISTRAL, sp, "mistral-instruct", position="last").endswith(
        f"[INST] {sp}\n\nWhat is 2+2? [/INST]"
    )
    assert apply_system_prompt(HH, None, "hh") == HH
    assert apply_system_prompt(HH, "", "hh") == HH
    with pytest.raises(ValueError, match="no user turn"):
        apply_system_prompt(MISTRAL, sp, "hh")
    assert render_prompt(TURNS, "hh", system_prompt=sp) == apply_system_prompt(HH, sp, "hh")


def test_coarse_actor_prompt() -> None:
    assert "step by step" in COARSE_ACTOR_SYSTEM_PROMPT and "detail" in COARSE_ACTOR_SYSTEM_PROMPT


def test_hh_to_mistral_merges_consecutive_turns() -> None:
    from c2f_megatron.data import ChatFormat, load_tokenizer

    chat = ChatFormat("mistral-instruct", load_tokenizer())
    hh = "\n\nHuman: first\n\nHuman: second\n\nAssistant: ok\n\nHuman: third\n\nAssistant:"
    assert chat.from_hh(hh) == "[INST] first\n\nsecond [/INST] ok</s>[INST] third [/INST]"
    assert merge_consecutive_turns([("user", "a"), ("user", "b")], sep=" ") == [("user", "a b")]
    assert chat.from_hh(HH) == MISTRAL


def test_strip_stop_tokens() -> None:
    assert strip_stop_tokens("abc</s></s>", ["</s>"]) == "abc"
    assert strip_stop_tokens(MISTRAL + "</s>", ["</s>"]) == MISTRAL  # mid-prompt "</s>" stays
    assert strip_stop_tokens("abc<|end|></s>", ["</s>", "<|end|>"]) == "abc"
    assert strip_stop_tokens("abc", []) == "abc"
    assert strip_stop_tokens("abc", [""]) == "abc"


def test_truncate_at_stop() -> None:
    text = "Sure, here it is.\n\nHuman: thanks\n\nAssistant: np"
    assert truncate_at_stop(text, ["\n\nHuman:", "\n\nAssistant:"]) == "Sure, here it is."
    assert truncate_at_stop("no stop", ["</s>"]) == "no stop"


def test_strip_stop_ids() -> None:
    assert strip_stop_ids([1, 5, 6, 2, 2, 0], {2, 0}) == [1, 5, 6]
    assert strip_stop_ids([2, 5, 6], [2]) == [2, 5, 6]
    assert strip_stop_ids([2, 2], [2]) == []
    assert strip_stop_ids([], [2]) == []
