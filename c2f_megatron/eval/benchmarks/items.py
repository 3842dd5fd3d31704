"""What every benchmark shares: its items, outcomes and results, seeded selection, and reading the files."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from c2f_megatron import files

Source = Literal["local", "hub"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class BenchmarkDataError(ValueError):
    """A benchmark file is missing or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: choice i is scored as log p(continuations[i] | contexts[i])."""

    item_id: str
    subtask: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class GenerationItem:
    """One question answered by greedy generation and compared to ``target`` after extraction."""

    item_id: str
    subtask: str
    prompt: str
    target: str
    kind: Literal["bbh", "bbh_mc", "gsm8k"]
    chance: float


@dataclass(frozen=True)
class ItemOutcome:
    item_id: str
    subtask: str
    gold: str
    prediction: str
    correct: bool
    chance: float


@dataclass(frozen=True)
class BenchmarkResult:
    """``value`` is the micro-average of ``metric``; ``chance`` the same average for uniform guessing;
    ``categories``: micro-averages per category of subtasks (MMLU's four), empty elsewhere."""

    name: str
    metric: str
    value: float
    n: int
    chance: float
    macro: float
    subtasks: dict[str, float]
    outcomes: tuple[ItemOutcome, ...]
    categories: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- selection


def select_indices(n_total: int, limit: int | None, seed: int) -> list[int]:
    """Indices of the evaluated items: all of them, or ``limit`` drawn with ``Random(seed)``, in file order."""
    if limit is None or limit >= n_total:
        return list(range(n_total))
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return sorted(random.Random(seed).sample(range(n_total), limit))


def _other_index(i: int, n: int, seed: int) -> int:
    """A deterministic exemplar index != i, for benchmarks whose few-shot examples come from the same file."""
    if n < 2:
        raise BenchmarkDataError("a 1-shot benchmark needs at least 2 records to draw an exemplar")
    j = random.Random(f"{seed}:{i}").randrange(n - 1)
    return j + 1 if j >= i else j


# ----------------------------------------------------------------------------------------------- file I/O


def read_jsonl(path: Path, error: type[ValueError] = BenchmarkDataError) -> list[dict[str, Any]]:
    """All records of a benchmark's JSON Lines file; a missing, unreadable or empty file, a line that is not
    UTF-8 or not JSON, or a record that is not an object raises ``error`` naming file:line."""
    rows = files.read_jsonl(path, error)
    if not rows:
        raise error(f"{path}: empty file (no records)")
    for k, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise error(f"{path}: record {k}: expected a JSON object, got {type(row).__name__}")
    return rows


def read_text(path: Path, error: type[ValueError] = BenchmarkDataError) -> str:
    """The text of a benchmark file (CSV, JSON, a prompt); a missing, unreadable or empty file, or one that
    is not UTF-8 (file:line), raises ``error``."""
    text = "".join(files.decode_line(path, n, raw, error) for n, raw in files.read_lines(path, error))
    if not text.strip():
        raise error(f"{path}: empty file")
    return text


def read_json(path: Path, error: type[ValueError] = BenchmarkDataError) -> Any:
    """A benchmark's JSON file (``read_text``); invalid JSON raises ``error`` naming file:line."""
    try:
        return json.loads(read_text(path, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e


def require_field(
    row: dict[str, Any], key: str, where: str, error: type[ValueError] = BenchmarkDataError
) -> Any:
    """``row[key]``, or ``error`` naming the record (``where``) and the missing field."""
    if key not in row:
        raise error(f"{where}: missing field {key!r}")
    return row[key]


def _require_dir(data_dir: Path | None, sub: str) -> Path:
    if data_dir is None:
        raise BenchmarkDataError(
            f"data_dir is required to read {sub}/ from local files (e.g. ../shared/data)"
        )
    path = Path(data_dir) / sub
    if not path.is_dir():
        raise BenchmarkDataError(f"{path}: directory not found")
    return path


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BenchmarkDataError("source='hub' needs the 'datasets' package") from e
    return datasets
