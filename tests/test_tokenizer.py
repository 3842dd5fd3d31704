"""Tokenizer backends: the default Mistral v0.1 sentencepiece model, .model files, HF directories, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from c2f_megatron.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerInfo,
    load_tokenizer,
    mistral_v01_model_path,
)

HH_PROMPT = "\n\nHuman: What is a good recipe for pancakes?\n\nAssistant:"
HH_RESPONSE = "Mix 1 cup flour, 1 egg and 1 cup milk.\n\nFry on medium heat — about 2 minutes per side!"


@pytest.fixture(scope="module")
def mistral() -> Tokenizer:
    return load_tokenizer()


def test_default_is_mistral_v01(mistral: Tokenizer) -> None:
    assert isinstance(mistral, SentencePieceTokenizer)
    assert mistral.name == "mistral-v0.1"
    assert (mistral.vocab_size, mistral.bos_id, mistral.eos_id, mistral.pad_id) == (32000, 1, 2, 0)
    assert load_tokenizer("mistral-v0.1").info() == mistral.info()


def test_known_ids(mistral: Tokenizer) -> None:
    # Ids measured with the mistral-common v1 model; "▁" (28705) is the sentencepiece dummy prefix.
    assert mistral.encode("\n\nHuman: hi\n\nAssistant:") == [
        28705, 13, 13, 28769, 6366, 28747, 12014, 13, 13, 7226, 11143, 28747,
    ]  # fmt: skip
    ids = mistral.encode("Hello world", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]


def test_matches_mistral_common_raw_tokenizer(mistral: Tokenizer) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = MistralTokenizer.v1().instruct_tokenizer.tokenizer
    for text in ["Hello world", HH_PROMPT, HH_RESPONSE, "  spaces\tand tabs\n"]:
        assert mistral.encode(text, add_bos=True, add_eos=True) == reference.encode(text, bos=True, eos=True)


@pytest.mark.parametrize(
    "text", ["Hello world", HH_PROMPT + " " + HH_RESPONSE, "héllo 你好 🦄 \x00 \t  x", "line\n\n\nend"]
)
def test_roundtrip_and_pad_never_emitted(mistral: Tokenizer, text: str) -> None:
    ids = mistral.encode(text)
    assert mistral.decode(ids) == text
    assert mistral.pad_id not in ids  # byte fallback: <unk> (our pad) never appears in real text


def test_decode_drops_special_and_pad(mistral: Tokenizer) -> None:
    ids = mistral.encode("Hello", add_bos=True, add_eos=True)
    assert mistral.decode(ids + [mistral.pad_id] * 3) == "Hello"


def test_parse_special(mistral: Tokenizer) -> None:
    assert 2 not in mistral.encode("a</s>b")
    assert mistral.encode("a</s>b", parse_special=True) == [*mistral.encode("a"), 2, *mistral.encode("b")]
    assert mistral.encode("<s>x", parse_special=True) == [1, *mistral.encode("x")]


@pytest.mark.parametrize(
    ("prompt", "response"),
    [
        (HH_PROMPT, HH_RESPONSE),
        (HH_PROMPT, "Sure."),
        (HH_PROMPT, 'I\'m not sure — "quotes", émojis 🙂 and 123,456.'),
        ("[INST] What is 2+2? [/INST]", "4"),
        ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: why?\n\nAssistant:", "Because.\n\n1. one\n2. two"),
    ],
)
def test_encode_pair_matches_joint_tokenization(mistral: Tokenizer, prompt: str, response: str) -> None:
    prompt_ids, response_ids = mistral.encode_pair(prompt, response)
    full = prompt + " " + response
    assert prompt_ids == mistral.encode(prompt)
    assert prompt_ids + response_ids == mistral.encode(full)
    assert mistral.decode(prompt_ids + response_ids) == full
    # A single leading space is the separator, not part of the response.
    assert mistral.encode_pair(prompt, " " + response) == (prompt_ids, response_ids)


def test_encode_pair_on_real_hh_pairs(mistral: Tokenizer, shared_data: Path) -> None:
    from c2f_megatron.data.hh_rlhf import load_hh_rlhf

    pairs = load_hh_rlhf(shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz").pairs
    for pair in pairs:
        for response in (pair.chosen, pair.rejected):
            prompt_ids, response_ids = mistral.encode_pair(pair.prompt, response)
            assert prompt_ids + response_ids == mistral.encode(f"{pair.prompt} {response}")
            assert mistral.decode(prompt_ids + response_ids) == f"{pair.prompt} {response}"


def test_model_file_spec(mistral: Tokenizer) -> None:
    path = mistral_v01_model_path()
    tok = load_tokenizer(str(path))
    assert tok.name == str(path)
    assert tok.encode(HH_PROMPT) == mistral.encode(HH_PROMPT)
    assert tok.info().fingerprint == mistral.info().fingerprint


def test_info_roundtrips_through_json(mistral: Tokenizer) -> None:
    info = mistral.info()
    assert TokenizerInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    assert len(info.fingerprint) == 64


def _save_word_level(path: Path, with_pad: bool = True) -> Path:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "<s>", "</s>", "hello", "world", "how", "are", "you", "?"]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "[UNK]"}
    if with_pad:
        special["pad_token"] = "[PAD]"
    PreTrainedTokenizerFast(tokenizer_object=raw, **special).save_pretrained(path)
    return path


def test_hf_directory(tmp_path: Path) -> None:
    tok = load_tokenizer(str(_save_word_level(tmp_path / "tok")))
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (10, 2, 3, 1)
    assert tok.encode("hello world", add_bos=True, add_eos=True) == [2, 4, 5, 3]
    assert tok.decode([2, 4, 5, 3, 1, 1]) == "hello world"
    assert tok.encode_pair("hello world", "how are you ?") == ([4, 5], [6, 7, 8, 9])
    # Special-token text is literal unless parse_special is set.
    assert tok.encode("hello</s>") == [0]
    assert tok.encode("hello</s>", parse_special=True) == [4, 3]
    info = tok.info()
    assert (info.backend, info.name, info.vocab_size) == ("huggingface", str(tmp_path / "tok"), 10)


def test_hf_pad_falls_back_to_unk(tmp_path: Path) -> None:
    tok = load_tokenizer(str(_save_word_level(tmp_path / "tok", with_pad=False)))
    assert tok.pad_id == 0


@pytest.mark.parametrize("spec", ["no-such-tokenizer", "/nonexistent/tokenizer.model", "not a/hub name!"])
def test_bad_spec_names_the_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="tokenizer spec") as err:
        load_tokenizer(spec)
    assert repr(spec) in str(err.value)


def test_bad_spec_existing_non_tokenizer_paths(tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hi")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        load_tokenizer(str(text_file))
    with pytest.raises(ValueError, match="could not load tokenizer"):
        load_tokenizer(str(tmp_path))  # a directory without tokenizer files
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=r"corrupt\.model"):
        load_tokenizer(str(corrupt))
