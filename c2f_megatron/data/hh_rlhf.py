"""Anthropic HH-RLHF preference pairs: parsing, loading with malformed-record accounting, splits, RL prompts.

Each record holds two full dialogues, ``chosen`` and ``rejected``, that share every turn but the last
Assistant turn. We split both at their last ``"\\n\\nAssistant:"`` into a shared prompt and two responses.
Records that do not fit this shape are never dropped silently: the loader returns them as
:class:`MalformedRecord` (file, line, reason) and logs a summary, because a reward model trained on
mis-split pairs learns from text that was never the response. A source that gives no pair at all (empty,
only blank lines, every record malformed), a file that cannot be read (truncated or corrupt gzip) and a
training split left empty raise :class:`~c2f_megatron.files.DataFileError` naming the file, before
anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from c2f_megatron.data.chat import ChatFormat
from c2f_megatron.data.templates import HH_ASSISTANT, PromptFormat, strip_stop_tokens
from c2f_megatron.files import DataFileError, read_lines, write_atomic

logger = logging.getLogger(__name__)

# The run-directory file that lists a job's malformed records.
SKIPPED_RECORDS_FILE = "skipped_records.txt"

# Reasons a record is malformed (MalformedRecord.reason).
BAD_JSON = "bad_json"
BAD_UTF8 = "bad_utf8"
NOT_AN_OBJECT = "not_an_object"
EMPTY_LINE = "empty_line"
MISSING_FIELD = "missing_field"
NON_STRING_FIELD = "non_string_field"
NO_ASSISTANT_TURN = "no_assistant_turn"
PROMPT_MISMATCH = "prompt_mismatch"
EMPTY_RESPONSE = "empty_response"
IDENTICAL_PAIR = "identical_pair"

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: ``prompt`` ends with ``"\\n\\nAssistant:"``; responses have no leading space.

    The full texts the annotators compared are ``prompt + " " + response`` (see ``chosen_text``).
    ``source``/``line`` locate the record (file path and 1-based line, or hub split and 1-based row).
    """

    prompt: str
    chosen: str
    rejected: str
    source: str = ""
    line: int = 0

    @property
    def chosen_text(self) -> str:
        return f"{self.prompt} {self.chosen}"

    @property
    def rejected_text(self) -> str:
        return f"{self.prompt} {self.rejected}"


@dataclass(frozen=True)
class MalformedRecord:
    file: str
    line: int
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


class MalformedPairError(ValueError):
    """Raised by :func:`parse_pair`; ``reason`` is one of the module's reason constants."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _split_dialogue(text: str, which: str) -> tuple[str, str]:
    at = text.rfind(HH_ASSISTANT)
    if at < 0:
        raise MalformedPairError(NO_ASSISTANT_TURN, f"no {HH_ASSISTANT!r} in {which}")
    end = at + len(HH_ASSISTANT)
    return text[:end], text[end:].strip()


def parse_pair(chosen_text: str, rejected_text: str, source: str = "", line: int = 0) -> PreferencePair:
    """Split two full HH dialogues into a shared prompt and two responses.

    Each text is split at its last ``"\\n\\nAssistant:"``; the responses are stripped of surrounding
    whitespace. Raises :class:`MalformedPairError` when there is no Assistant turn, the two prompts differ
    (e.g. a response that itself contains ``"\\n\\nAssistant:"``), a response is empty, or the two
    dialogues are identical.
    """
    if chosen_text == rejected_text:
        raise MalformedPairError(IDENTICAL_PAIR, "chosen == rejected")
    chosen_prompt, chosen = _split_dialogue(chosen_text, "chosen")
    rejected_prompt, rejected = _split_dialogue(rejected_text, "rejected")
    if chosen_prompt != rejected_prompt:
        if chosen_prompt.startswith(rejected_prompt) or rejected_prompt.startswith(chosen_prompt):
            longer = "chosen" if len(chosen_prompt) > len(rejected_prompt) else "rejected"
            detail = f"the {longer} response itself contains {HH_ASSISTANT!r}"
        else:
            detail = f"prompts of {len(chosen_prompt)} and {len(rejected_prompt)} chars differ"
        raise MalformedPairError(PROMPT_MISMATCH, detail)
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise MalformedPairError(EMPTY_RESPONSE, f"{name} response is empty")
    if chosen == rejected:
        raise MalformedPairError(IDENTICAL_PAIR, "responses equal after stripping whitespace")
    return PreferencePair(chosen_prompt, chosen, rejected, source, line)


def _pair_from_record(record: Any, source: str, line: int) -> PreferencePair:
    if not isinstance(record, dict):
        raise MalformedPairError(NOT_AN_OBJECT, f"JSON {type(record).__name__}, expected an object")
    for name in ("chosen", "rejected"):
        if name not in record:
            raise MalformedPairError(MISSING_FIELD, f"no {name!r} field")
        if not isinstance(record[name], str):
            raise MalformedPairError(NON_STRING_FIELD, f"{name!r} is {type(record[name]).__name__}")
    return parse_pair(record["chosen"], record["rejected"], source, line)


@dataclass
class LoadResult:
    """Pairs that parsed, records that did not, and the files/splits read."""

    pairs: list[PreferencePair] = field(default_factory=list)
    malformed: list[MalformedRecord] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    truncated_to: int | None = None

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(m.reason for m in self.malformed).most_common())

    def report(self, max_listed: int = 50) -> str:
        """Human-readable summary: counts per reason and each malformed record's file:line."""
        lines = [
            f"HH-RLHF: {len(self.pairs)} pairs from {len(self.sources)} source(s); "
            f"{len(self.malformed)} malformed record(s) skipped"
            + (f"; kept the first {self.truncated_to} pairs (max_pairs)" if self.truncated_to else "")
        ]
        lines += [f"  {reason}: {n}" for reason, n in self.reason_counts().items()]
        lines += [f"  {m}" for m in self.malformed[:max_listed]]
        if len(self.malformed) > max_listed:
            lines.append(f"  ... and {len(self.malformed) - max_listed} more")
        return "\n".join(lines)

    def log(self, skipped_log: str | Path | None = None) -> Path | None:
        """Log the summary; with ``skipped_log`` the full list of malformed records goes to that file,
        which is returned (None when there were none or no file was given)."""
        if self.malformed and skipped_log is not None:
            skipped_log = Path(skipped_log)
            write_atomic(skipped_log, self.report(max_listed=len(self.malformed)) + "\n")
            logger.warning("%s; listed in %s", self.report().split("\n", 1)[0], skipped_log)
            return skipped_log
        if self.malformed:
            logger.warning("%s", self.report(max_listed=5))
        else:
            logger.info("%s", self.report())
        return None


def _check_source(source: str, pairs: int, malformed: Sequence[MalformedRecord], empty: str) -> None:
    """A source that gave no pair is refused: it is empty, or not HH-RLHF data at all."""
    if pairs:
        return
    records = [m for m in malformed if m.reason != EMPTY_LINE]
    if not malformed:
        raise DataFileError(f"{source}: {empty}")
    if not records:
        raise DataFileError(f"{source}: {empty} (only blank lines)")
    first = records[0]
    if all(m.reason == BAD_UTF8 for m in records):
        raise DataFileError(f"{source}:{first.line}: not valid UTF-8 ({first.detail}); no line decodes")
    counts = ", ".join(f"{r} {n}" for r, n in Counter(m.reason for m in records).most_common())
    raise DataFileError(
        f"{source}: no valid preference pair: all {len(records)} record(s) skipped ({counts}); first at "
        f"line {first.line}: {first.reason}" + (f" ({first.detail})" if first.detail else "")
    )


def _load_file(path: Path, result: LoadResult) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    source = str(path)
    result.sources.append(source)
    pairs, malformed = len(result.pairs), len(result.malformed)
    for line_no, raw in read_lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            detail = f"{exc.reason} at byte {exc.start}"
            result.malformed.append(MalformedRecord(source, line_no, BAD_UTF8, detail))
            continue
        if not text.strip():
            result.malformed.append(MalformedRecord(source, line_no, EMPTY_LINE))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            result.malformed.append(MalformedRecord(source, line_no, BAD_JSON, exc.msg))
            continue
        _add_record(record, source, line_no, result)
    _check_source(source, len(result.pairs) - pairs, result.malformed[malformed:], "empty file")


def _add_record(record: Any, source: str, line: int, result: LoadResult) -> None:
    try:
        result.pairs.append(_pair_from_record(record, source, line))
    except MalformedPairError as exc:
        result.malformed.append(MalformedRecord(source, line, exc.reason, exc.detail))


def _load_hub(name: str, data_dir: str | None, split: str | None, result: LoadResult) -> None:
    import datasets  # heavy import, only needed for hub sources

    where = f"hub:{name}" + (f"/{data_dir}" if data_dir else "")
    try:
        loaded = datasets.load_dataset(name, data_dir=data_dir, split=split)
    except (OSError, ValueError) as exc:  # offline, no such dataset or split
        reason = str(exc).strip().split("\n", 1)[0]
        raise DataFileError(f"{where}: cannot load from the hub ({type(exc).__name__}: {reason})") from exc
    splits = {split: loaded} if split is not None else dict(sorted(loaded.items()))
    for split_name, rows in splits.items():
        source = f"{where}[{split_name}]"
        result.sources.append(source)
        pairs, malformed = len(result.pairs), len(result.malformed)
        for row_no, record in enumerate(rows, start=1):
            _add_record(record, source, row_no, result)
        _check_source(source, len(result.pairs) - pairs, result.malformed[malformed:], "empty split")


def _jsonl_files(directory: Path, split: str | None) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith(_JSONL_SUFFIXES))
    if split is not None:
        files = [p for p in files if re.sub(r"\.jsonl(\.gz)?$", "", p.name) == split]
    if not files:
        which = f"{split}.jsonl[.gz]" if split else "*.jsonl / *.jsonl.gz"
        raise FileNotFoundError(f"{directory}: no HH-RLHF files ({which}) under it")
    return files


def load_hh_rlhf(
    source: str | Path | Sequence[str | Path],
    split: str | None = None,
    data_dir: str | None = None,
    max_pairs: int | None = None,
    skipped_log: str | Path | None = None,
) -> LoadResult:
    """Load preference pairs from local files or the Hugging Face hub.

    ``source`` is a ``.jsonl``/``.jsonl.gz`` file, a directory (every such file under it, sorted by path;
    with ``split`` only files named ``{split}.jsonl[.gz]``), a hub dataset name such as
    ``"Anthropic/hh-rlhf"`` (``datasets.load_dataset(name, data_dir=data_dir, split=split)``; ``split=None``
    loads every split), or a list of these, read in order. ``split`` does not apply to an explicit file.
    ``max_pairs`` keeps the first pairs in reading order. Malformed records are reported, not raised;
    a missing file raises ``FileNotFoundError``, an unreadable one or a source without a single valid pair
    ``DataFileError``, each naming the file. With ``skipped_log`` the full list of malformed records goes
    to that file and the log gets one line with their count.
    """
    result = _read_sources(source, split, data_dir, max_pairs)
    result.log(skipped_log)
    return result


def _read_sources(
    source: str | Path | Sequence[str | Path], split: str | None, data_dir: str | None, max_pairs: int | None
) -> LoadResult:
    result = LoadResult()
    sources = [source] if isinstance(source, str | Path) else list(source)
    for src in sources:
        path = Path(src).expanduser()
        if path.is_dir():
            for file in _jsonl_files(path, split):
                _load_file(file, result)
        elif path.exists() or str(src).endswith((*_JSONL_SUFFIXES, ".gz")):
            _load_file(path, result)
        elif isinstance(src, str) and _HUB_NAME.match(src):
            _load_hub(src, data_dir, split, result)
        else:
            raise FileNotFoundError(f"HH-RLHF source {str(src)!r} is not a file, directory or hub name")
    if max_pairs is not None and len(result.pairs) > max_pairs:
        result.pairs = result.pairs[:max_pairs]
        result.truncated_to = max_pairs
    return result


def _eval_score(prompt: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def train_eval_split(
    pairs: Sequence[PreferencePair], eval_fraction: float, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministic split by a seeded hash of the prompt text.

    A pair goes to eval when ``sha256(seed, prompt)`` maps below ``eval_fraction``, so membership does not
    depend on file order and pairs sharing a prompt always land on the same side. The eval size is
    ``eval_fraction * len(pairs)`` only in expectation. Input order is kept within each part.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    train: list[PreferencePair] = []
    evals: list[PreferencePair] = []
    for pair in pairs:
        (evals if _eval_score(pair.prompt, seed) < eval_fraction else train).append(pair)
    return train, evals


def prompts_for_rl(
    pairs: Iterable[PreferencePair],
    chat: ChatFormat,
    system_prompt: str | None = None,
    stop_strings: Sequence[str] = ("</s>",),
) -> list[str]:
    """Unique prompts (first-seen order) for RL rollouts, rendered in ``chat``'s format.

    The optional system prompt (e.g. the coarse-actor instruction) is added, and trailing stop strings
    are removed so the policy does not start from an end-of-sequence marker.
    """
    seen: dict[str, None] = {}
    for pair in pairs:
        seen.setdefault(strip_stop_tokens(chat.from_hh(pair.prompt, system_prompt), stop_strings))
    return list(seen)


@dataclass
class HHDataConfig:
    """The HH-RLHF part of the training config (plain fields, so it maps 1:1 to YAML).

    ``prompt_format`` is kept as a plain string (validated against :class:`PromptFormat`) so that
    ``dataclasses.asdict`` output can be written with ``yaml.safe_dump``.

    The default reads the real dataset from the hub; offline, point ``source`` at a local file or
    directory such as ``../shared/data/hh-rlhf/harmless-base/test.jsonl.gz``.
    """

    source: str = "Anthropic/hh-rlhf"
    data_dir: str | None = None
    split: str | None = "train"
    eval_fraction: float = 0.05
    seed: int = 0
    max_pairs: int | None = None
    prompt_format: str = PromptFormat.HH.value

    def __post_init__(self) -> None:
        self.prompt_format = PromptFormat(self.prompt_format).value
        if not self.source.strip():
            raise ValueError("source must name a .jsonl[.gz] file, a directory or a hub dataset, got ''")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_pairs is not None and self.max_pairs <= 0:
            raise ValueError(f"max_pairs must be positive or null, got {self.max_pairs}")


@dataclass
class HHData:
    train: list[PreferencePair]
    eval: list[PreferencePair]
    load: LoadResult
    skipped_log: Path | None = None  # the list of malformed records, when there were any


def load_from_config(cfg: HHDataConfig, skipped_log: str | Path | None = None, *, log: bool = True) -> HHData:
    """Load and split as configured (``skipped_log``: where the list of malformed records goes).

    Every caller trains on, or holds out from what the trainers trained on, the train part: an empty one
    raises ``DataFileError`` naming the sources and the split, before anything is logged or written.
    ``log=False`` leaves the summary and the list to the caller (``data.load.log(path)``), for one that can
    still refuse the data (the PPO prompt stream: every prompt too long)."""
    result = _read_sources(cfg.source, cfg.split, cfg.data_dir, cfg.max_pairs)
    train, evals = train_eval_split(result.pairs, cfg.eval_fraction, cfg.seed)
    if not train:
        kept = f" (the first {result.truncated_to}: max_pairs)" if result.truncated_to else ""
        raise DataFileError(
            f"{', '.join(result.sources)}: the training split is empty: all {len(result.pairs)} pair(s)"
            f"{kept} fall in the held-out part (eval_fraction {cfg.eval_fraction}, seed {cfg.seed})"
        )
    return HHData(train, evals, result, result.log(skipped_log) if log else None)
