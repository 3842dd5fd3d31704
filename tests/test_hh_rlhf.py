"""HH-RLHF loading: the real harmless-base test file, broken files, splits, RL prompts, hub loading."""

from __future__ import annotations

import gzip
import json
import logging
import random
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from c2f_megatron.data.hh_rlhf import (
    HHDataConfig,
    LoadResult,
    MalformedPairError,
    PreferencePair,
    load_from_config,
    load_hh_rlhf,
    parse_pair,
    prompts_for_rl,
    train_eval_split,
)
from c2f_megatron.data.templates import COARSE_ACTOR_SYSTEM_PROMPT, PromptFormat

P = "\n\nHuman: How do I bake bread?\n\nAssistant:"


@pytest.fixture(scope="module")
def hh_file(shared_data: Path) -> Path:
    return shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


@pytest.fixture(scope="module")
def real(hh_file: Path) -> LoadResult:
    return load_hh_rlhf(hh_file)


# --- parse_pair ---------------------------------------------------------------------------------------


def test_parse_pair_splits_at_last_assistant_turn() -> None:
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bread?"
    pair = parse_pair(f"{prompt}\n\nAssistant: Knead it.", f"{prompt}\n\nAssistant:  No.  ")
    assert pair.prompt == prompt + "\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == ("Knead it.", "No.")
    assert pair.chosen_text == f"{prompt}\n\nAssistant: Knead it."


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        (f"{P} a", f"{P} a", "identical_pair"),
        (f"{P} a", f"{P} a ", "identical_pair"),
        ("\n\nHuman: no reply", "\n\nHuman: no reply either", "no_assistant_turn"),
        (f"{P} a", "\n\nHuman: other\n\nAssistant: b", "prompt_mismatch"),
        (f"{P} a\n\nAssistant: b", f"{P} c", "prompt_mismatch"),
        (f"{P} ", f"{P} b", "empty_response"),
        (f"{P} a", f"{P}", "empty_response"),
    ],
)
def test_parse_pair_rejects(chosen: str, rejected: str, reason: str) -> None:
    with pytest.raises(MalformedPairError) as err:
        parse_pair(chosen, rejected)
    assert err.value.reason == reason


# --- the real harmless-base test file -------------------------------------------------------------------

# Measured on harmless-base/test.jsonl.gz: 4 records have an empty chosen response (chosen = "say nothing"),
# 5 have a response that itself contains "\n\nAssistant:", so the last-Assistant split differs between
# chosen and rejected.
EXPECTED_MALFORMED = {
    87: "empty_response",
    517: "empty_response",
    926: "empty_response",
    1104: "empty_response",
    1255: "prompt_mismatch",
    1689: "prompt_mismatch",
    1951: "prompt_mismatch",
    1953: "prompt_mismatch",
    2037: "prompt_mismatch",
}


def test_real_file_counts(real: LoadResult, hh_file: Path) -> None:
    assert len(real.pairs) + len(real.malformed) == 2312
    assert len(real.pairs) == 2303
    assert {m.line: m.reason for m in real.malformed} == EXPECTED_MALFORMED
    assert all(m.file == str(hh_file) for m in real.malformed)
    assert real.reason_counts() == {"prompt_mismatch": 5, "empty_response": 4}
    assert real.sources == [str(hh_file)]
    report = real.report()
    assert "2303 pairs" in report and "9 malformed" in report and f"{hh_file}:1255: prompt_mismatch" in report


def test_real_file_pairs_reconstruct_the_records(real: LoadResult, hh_file: Path) -> None:
    with gzip.open(hh_file, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    for pair in real.pairs:
        assert pair.prompt.startswith("\n\nHuman:") and pair.prompt.endswith("\n\nAssistant:")
        assert pair.chosen and pair.rejected and pair.chosen != pair.rejected
        record = records[pair.line - 1]
        assert pair.chosen_text == record["chosen"] and pair.rejected_text == record["rejected"]


def test_real_file_split(real: LoadResult) -> None:
    train, evals = train_eval_split(real.pairs, 0.05, seed=0)
    key = lambda p: (p.source, p.line)  # noqa: E731
    assert len(train) + len(evals) == len(real.pairs)
    assert not {key(p) for p in train} & {key(p) for p in evals}
    assert not {p.prompt for p in train} & {p.prompt for p in evals}
    assert 0.03 < len(evals) / len(real.pairs) < 0.07
    assert train_eval_split(real.pairs, 0.05, seed=0) == (train, evals)  # deterministic
    shuffled = list(real.pairs)
    random.Random(1).shuffle(shuffled)
    _, evals2 = train_eval_split(shuffled, 0.05, seed=0)
    assert {key(p) for p in evals2} == {key(p) for p in evals}  # stable under input order
    _, evals3 = train_eval_split(real.pairs, 0.05, seed=1)
    assert {key(p) for p in evals3} != {key(p) for p in evals}
    assert train_eval_split(real.pairs, 0.0, seed=0) == (list(real.pairs), [])
    with pytest.raises(ValueError):
        train_eval_split(real.pairs, 1.0, seed=0)


def test_real_file_rl_prompts(real: LoadResult) -> None:
    from c2f_megatron.data import ChatFormat, load_tokenizer

    tok = load_tokenizer()
    prompts = prompts_for_rl(real.pairs, ChatFormat("hh", tok))
    assert len(prompts) == len({p.prompt for p in real.pairs}) == 2301
    assert prompts[0] == real.pairs[0].prompt
    coarse = prompts_for_rl(
        real.pairs, ChatFormat("mistral-instruct", tok), system_prompt=COARSE_ACTOR_SYSTEM_PROMPT
    )
    assert len(coarse) == 2301
    assert all(
        p.startswith(f"[INST] {COARSE_ACTOR_SYSTEM_PROMPT}\n\n") and p.endswith(" [/INST]") for p in coarse
    )


# --- broken files -----------------------------------------------------------------------------------------

BROKEN_LINES = [
    json.dumps({"chosen": f"{P} Knead.", "rejected": f"{P} Buy it."}),  # 1 ok
    '{"chosen": "unterminated',  # 2 bad_json
    json.dumps({"chosen": f"{P} a"}),  # 3 missing_field
    json.dumps({"chosen": f"{P} a", "rejected": 7}),  # 4 non_string_field
    json.dumps({"chosen": "\n\nHuman: x", "rejected": "\n\nHuman: y"}),  # 5 no_assistant_turn
    json.dumps({"chosen": f"{P} same", "rejected": f"{P} same"}),  # 6 identical_pair
    "",  # 7 empty_line
    json.dumps(["not", "an", "object"]),  # 8 not_an_object
    json.dumps({"chosen": f"{P} ", "rejected": f"{P} b"}),  # 9 empty_response
    json.dumps({"chosen": f"{P} Rise.", "rejected": f"{P} No.", "extra": 1}),  # 10 ok
]
BROKEN_EXPECTED = {
    2: "bad_json",
    3: "missing_field",
    4: "non_string_field",
    5: "no_assistant_turn",
    6: "identical_pair",
    7: "empty_line",
    8: "not_an_object",
    9: "empty_response",
}


def _write(path: Path, lines: list[str]) -> Path:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("name", ["broken.jsonl", "broken.jsonl.gz"])
def test_broken_file_reports_file_and_line(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path / name, BROKEN_LINES)
    with caplog.at_level(logging.WARNING, logger="c2f_megatron.data.hh_rlhf"):
        result = load_hh_rlhf(path)
    assert [(p.line, p.chosen) for p in result.pairs] == [(1, "Knead."), (10, "Rise.")]
    assert {m.line: m.reason for m in result.malformed} == BROKEN_EXPECTED
    report = result.report()
    for line, reason in BROKEN_EXPECTED.items():
        assert f"{path}:{line}: {reason}" in report
    assert "8 malformed" in caplog.text and f"{path}:2: bad_json" in caplog.text


def test_bad_utf8_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "utf8.jsonl"
    path.write_bytes(BROKEN_LINES[0].encode() + b"\n\xff\xfe{}\n" + BROKEN_LINES[9].encode() + b"\n")
    result = load_hh_rlhf(path)
    assert len(result.pairs) == 2
    assert [(m.line, m.reason) for m in result.malformed] == [(2, "bad_utf8")]


def test_directory_source_and_split_filter(tmp_path: Path) -> None:
    _write(tmp_path / "b" / "train.jsonl.gz", BROKEN_LINES[:1])
    _write(tmp_path / "a" / "train.jsonl", BROKEN_LINES[9:])
    _write(tmp_path / "a" / "test.jsonl.gz", BROKEN_LINES[:2])
    (tmp_path / "a" / "README.md").write_text("not data")
    everything = load_hh_rlhf(tmp_path)
    assert everything.sources == [
        str(tmp_path / p) for p in ("a/test.jsonl.gz", "a/train.jsonl", "b/train.jsonl.gz")
    ]
    assert len(everything.pairs) == 3 and len(everything.malformed) == 1
    train = load_hh_rlhf(tmp_path, split="train")
    assert [p.chosen for p in train.pairs] == ["Rise.", "Knead."]
    with pytest.raises(FileNotFoundError, match="validation"):
        load_hh_rlhf(tmp_path, split="validation")
    both = load_hh_rlhf([tmp_path / "a" / "train.jsonl", str(tmp_path / "b" / "train.jsonl.gz")])
    assert [p.chosen for p in both.pairs] == ["Rise.", "Knead."]
    assert len(load_hh_rlhf(tmp_path, max_pairs=2).pairs) == 2


def test_unreadable_files_raise_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl.gz"
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl\.gz"):
        load_hh_rlhf(missing)
    not_gz = _write(tmp_path / "plain.jsonl", BROKEN_LINES).rename(tmp_path / "plain.jsonl.gz")
    with pytest.raises(OSError, match=r"plain\.jsonl\.gz.*not gzip"):
        load_hh_rlhf(not_gz)
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(gzip.compress(("\n".join(BROKEN_LINES * 50)).encode())[:200])
    with pytest.raises(OSError, match=r"truncated\.jsonl\.gz"):
        load_hh_rlhf(truncated)
    with pytest.raises(FileNotFoundError, match="not a file, directory or hub name"):
        load_hh_rlhf("no_such_thing")


# --- hub loading (monkeypatched; the real call needs the network) -------------------------------------------


def test_hub_source_uses_datasets_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    rows = {
        "train": [{"chosen": f"{P} Knead.", "rejected": f"{P} Buy it."}, {"chosen": f"{P} x"}],
        "test": [{"chosen": f"{P} Rise.", "rejected": f"{P} No."}],
    }

    def fake_load_dataset(name: str, data_dir: str | None = None, split: str | None = None) -> Any:
        calls.append({"name": name, "data_dir": data_dir, "split": split})
        return rows if split is None else rows[split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    result = load_hh_rlhf("Anthropic/hh-rlhf", split="train", data_dir="harmless-base")
    assert calls == [{"name": "Anthropic/hh-rlhf", "data_dir": "harmless-base", "split": "train"}]
    assert [p.chosen for p in result.pairs] == ["Knead."]
    assert [str(m) for m in result.malformed] == [
        "hub:Anthropic/hh-rlhf/harmless-base[train]:2: missing_field (no 'rejected' field)"
    ]
    every_split = load_hh_rlhf("Anthropic/hh-rlhf")
    assert every_split.sources == ["hub:Anthropic/hh-rlhf[test]", "hub:Anthropic/hh-rlhf[train]"]
    assert [p.chosen for p in every_split.pairs] == ["Rise.", "Knead."]


# --- config --------------------------------------------------------------------------------------------


def test_config_and_load_from_config(hh_file: Path) -> None:
    cfg = HHDataConfig(source=str(hh_file), prompt_format=PromptFormat.MISTRAL_INSTRUCT, max_pairs=200)
    assert type(cfg.prompt_format) is str and cfg.prompt_format == "mistral-instruct"
    assert cfg.split == "train"  # split does not apply to an explicit file
    data = load_from_config(cfg)
    assert len(data.train) + len(data.eval) == 200
    assert data.load.truncated_to == 200 and "kept the first 200" in data.load.report()
    assert isinstance(data.train[0], PreferencePair)
    with pytest.raises(ValueError):
        HHDataConfig(eval_fraction=1.5)
    with pytest.raises(ValueError):
        HHDataConfig(prompt_format="chatml")
