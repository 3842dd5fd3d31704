"""``ChatFormat``: the one way every stage renders and tokenizes dialogues, for sentencepiece Mistral and for
a Hugging Face tokenizer with a ChatML chat template (SmolLM2's template and special tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest

from c2f_megatron.data import ChatFormat, encode_prompts, load_tokenizer

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
HH = "\n\nHuman: Hi there\n\nHuman: again\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (SmolLM2's special tokens: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2 =
    EOS = declared pad) with the SmolLM2 ChatML template, saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["Hi there, how are you? Hello! I am fine, thanks.", "system user assistant helpful AI"] * 50
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("chatml") / "tok"
    fast.save_pretrained(out)
    return out


def test_chatml_tokenizer_conventions(chatml_dir):
    tok = load_tokenizer(str(chatml_dir))
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert not tok.adds_bos  # GPT-2-style BPE: no BOS of its own
    assert tok.pad_id == 0  # the declared pad is the EOS: <|endoftext|> pads so EOS stays visible
    assert tok.chat_template is not None


def test_chat_template_rendering_and_ids(chatml_dir):
    tok = load_tokenizer(str(chatml_dir))
    chat = ChatFormat("chat-template", tok)
    text = chat.from_hh(HH, system_prompt="Answer in detail.")
    assert text == (
        "<|im_start|>system\nAnswer in detail.<|im_end|>\n"
        "<|im_start|>user\nHi there\n\nagain<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
    )
    # without a system prompt the template's own default system turn is used
    assert chat.from_hh(HH).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = chat.encode_prompt(text)
    assert ids[0] == 1 and ids.count(1) == 5 and ids.count(2) == 4  # specials are ids, no BOS added
    assert chat.bos_id is None and chat.separator == "" and chat.stop_strings == []
    prompt_ids, response_ids = chat.encode_pair(text, "I am fine, thanks.")
    assert prompt_ids == ids
    assert prompt_ids + response_ids == tok.encode(text + "I am fine, thanks.", parse_special=True)
    assert tok.decode(response_ids) == "I am fine, thanks."


def test_mistral_instruct_multi_turn_parses_eos_and_adds_bos():
    """``</s>`` between Mistral turns is the EOS id (mistral-common's layout), and BOS starts the prompt."""
    tok = load_tokenizer()
    chat = ChatFormat("mistral-instruct", tok)
    text = chat.from_hh(HH)
    assert text == "[INST] Hi there\n\nagain [/INST] Hello!</s>[INST] How are you? [/INST]"
    ids = chat.encode_prompt(text)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1
    hh = ChatFormat("hh", tok)
    assert hh.encode_prompt(HH)[0] == tok.bos_id and hh.stop_strings == ["\n\nHuman:"]


def test_chat_template_refused_without_a_template():
    with pytest.raises(
        ValueError, match="prompt_format 'chat-template' needs a tokenizer with a chat template"
    ):
        ChatFormat("chat-template", load_tokenizer())


def test_encode_prompts_truncates_or_drops(chatml_dir):
    chat = ChatFormat("chat-template", load_tokenizer(str(chatml_dir)))
    short, long = chat.from_hh("\n\nHuman: Hi\n\nAssistant:"), chat.from_hh(HH)
    n_long = len(chat.encode_prompt(long))
    limit = n_long - 3
    kept = encode_prompts(chat, [short, long], [2], limit, "truncate")
    assert [t for t, _ in kept] == [short, long] and len(kept[1][1]) == limit
    assert kept[1][1] == chat.encode_prompt(long)[-limit:]
    assert [t for t, _ in encode_prompts(chat, [short, long], [2], limit, "drop")] == [short]
