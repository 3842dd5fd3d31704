"""One results table per evaluation run, written as Markdown, CSV and JSON with the run's metadata.

The three formats hold the same rows: Markdown to read, CSV to plot, JSON (with metadata and config) to
compare runs programmatically. Each file is written to a temporary path and renamed, so an interrupted
run never leaves a half-written table that looks complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from c2f_megatron.files import write_atomic

Row = dict[str, Any]


@dataclass(frozen=True)
class RunMetadata:
    model: str
    checkpoint: str
    seed: int
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    csv: Path
    json: Path


def _columns(rows: Sequence[Row]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def to_markdown(rows: Sequence[Row], meta: RunMetadata, title: str) -> str:
    cols = _columns(rows)
    lines = [
        f"# {title}",
        "",
        f"- model: {meta.model}",
        f"- checkpoint: {meta.checkpoint}",
        f"- seed: {meta.seed}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def to_json(rows: Sequence[Row], meta: RunMetadata, title: str) -> str:
    """Non-finite floats become null so the file is strict JSON."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    doc = {
        "title": title,
        "model": meta.model,
        "checkpoint": meta.checkpoint,
        "seed": meta.seed,
        "config": meta.config,
        "rows": list(rows),
    }
    return json.dumps(clean(doc), indent=2, ensure_ascii=False, default=str) + "\n"


def write_report(out_dir: Path | str, name: str, rows: Sequence[Row], meta: RunMetadata) -> ReportPaths:
    """Write ``<name>.md``, ``<name>.csv`` and ``<name>.json`` under ``out_dir``."""
    if not rows:
        raise ValueError(f"report {name!r}: no rows to write")
    out = Path(out_dir)
    paths = ReportPaths(out / f"{name}.md", out / f"{name}.csv", out / f"{name}.json")
    write_atomic(paths.markdown, to_markdown(rows, meta, name))
    write_atomic(paths.csv, to_csv(rows))
    write_atomic(paths.json, to_json(rows, meta, name))
    return paths


def benchmark_rows(results: Sequence[Any]) -> list[Row]:
    """Rows for ``benchmarks.BenchmarkResult`` objects (one per benchmark, per-item outcomes left out)."""
    return [
        {
            "benchmark": r.name,
            "metric": r.metric,
            "value": r.value,
            "macro": r.macro,
            "n": r.n,
            "chance": r.chance,
        }
        for r in results
    ]
