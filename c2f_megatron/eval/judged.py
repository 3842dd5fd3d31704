"""The judged evaluations' outputs: ``mt_bench.json`` and ``rubric.json``, and them as table rows and charts.

``c2f eval`` builds the two documents here (``mt_bench_doc``, ``rubric_doc``) and charts its own model and
baseline; the pipeline's report reads every row's files back into one ``mt_bench`` and one ``rubric``
table with charts across models. Both go through the functions here, so a field, a column or a chart has
one definition. Every row names its judge
(``judge``, ``judge_note``): a small or local judge is much weaker than GPT-4, and a reader must see which
one gave the numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from c2f_megatron.eval import mt_bench as mt
from c2f_megatron.eval import rubric
from c2f_megatron.eval.config import EvalConfig
from c2f_megatron.eval.rubric import CRITERIA

MT_BENCH_FILE = "mt_bench.json"
RUBRIC_FILE = "rubric.json"
Row = dict[str, Any]


def read_doc(path: Path) -> dict[str, Any] | None:
    """A judged output file, or None when that evaluation did not run."""
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------------------ documents


def mt_bench_doc(
    cfg: EvalConfig,
    client: Any,
    name: str,
    questions: list[Any],
    answers: dict[int, tuple[str, str]],
    baseline: tuple[str, dict[int, tuple[str, str]], dict[str, Any] | None] | None,
) -> dict[str, Any]:
    """Single grading of the model, and pairwise games against ``baseline`` = (name, answers, its earlier
    ``mt_bench.json`` or None); the ``mt_bench.json`` document."""
    mc, workers = cfg.mt_bench, cfg.judge.max_workers
    prompts = mt.load_judge_prompts(mc.judge_prompts)
    references = mt.load_reference_answers(mc.reference_answers)
    judgments = mt.judge_single(questions, answers, client, prompts, references, max_workers=workers)
    scores = mt.aggregate_single(judgments)
    doc: dict[str, Any] = {
        "model": name,
        "judge": cfg.judge.describe(),
        "overall": scores.overall,
        "per_turn": scores.per_turn,
        "per_category": scores.per_category,
        "n_scored": scores.n_scored,
        "n_errors": scores.n_errors,
        **mt.answers_to_json(questions, answers),
        "judgments": [j.__dict__ for j in judgments],
    }
    if baseline is not None:
        base_name, base_answers, base_doc = baseline
        pairs = mt.judge_pairwise(
            questions, answers, base_answers, client, prompts, references, max_workers=workers
        )
        doc["pairwise"] = {
            "baseline": base_name,
            "results": {k: v.__dict__ for k, v in mt.pairwise_by_category(pairs).items()},
            "judgments": [j.__dict__ for j in pairs],
        }
        if base_doc is not None and base_doc.get("judge") == doc["judge"]:
            doc["baseline_scores"] = {
                k: base_doc.get(k) for k in ("model", "overall", "per_turn", "per_category")
            }
    return doc


def rubric_doc(cfg: EvalConfig, client: Any, sides: list[tuple[Any, ...]]) -> dict[str, Any]:
    """The rubric on each side's first ``rubric.limit`` held-out responses; ``sides`` holds (model, role,
    prompts, responses, judgments to reuse or None). The ``rubric.json`` document."""
    weights = cfg.rubric.weights
    models = []
    for model, role, prompts, responses, reuse in sides:
        items = [rubric.RubricItem(p, r) for p, r in zip(prompts, responses)][: cfg.rubric.limit]
        if reuse is not None and len(reuse) == len(items):
            judgments = [rubric.judgment_from_text(j["index"], j["judgment"]) for j in reuse]
            scores = rubric.aggregate(judgments, weights)
        else:
            judgments, scores = rubric.judge_rubric(items, client, weights, cfg.judge.max_workers)
        block = {"model": model, "role": role, **scores.to_dict()}
        models.append({**block, "reused": reuse is not None, "judgments": [j.__dict__ for j in judgments]})
    return {
        "judge": cfg.judge.describe(),
        "weights": rubric.resolve_weights(weights),
        "weights_note": rubric.WEIGHTS_NOTE,
        "criteria": rubric.DEFINITIONS,
        "models": models,
    }


def reusable_rubric(base_path: Path, cfg: EvalConfig) -> list[dict[str, Any]] | None:
    """The baseline eval dir's own rubric judgments when the same judge gave them (its ``rubric.json``
    judged the ``responses.json`` beside it), so a pipeline judges the partner's responses once."""
    doc = read_doc(base_path / RUBRIC_FILE)
    if doc is None or doc.get("judge") != cfg.judge.describe():
        return None
    own = [m for m in doc.get("models", []) if m.get("role") == "model"]
    return own[0]["judgments"] if own else None


# ------------------------------------------------------------------------------------------ rows, charts


def _judge_columns(doc: dict[str, Any]) -> Row:
    judge = doc.get("judge") or {}
    return {"judge": judge.get("model"), "judge_note": judge.get("note")}


def mt_bench_row(doc: dict[str, Any], model: str | None = None) -> Row:
    """One table row of an ``mt_bench.json``: overall, per turn and per category scores, and the pairwise
    record against the baseline when the games were played (``win_rate``: ties count half)."""
    row: Row = {"model": model or doc.get("model"), **_judge_columns(doc), "overall": doc["overall"]}
    row.update({f"turn_{t}": v for t, v in doc.get("per_turn", {}).items()})
    row.update(doc.get("per_category", {}))
    row.update(n_scored=doc.get("n_scored"), n_errors=doc.get("n_errors"))
    pair = doc.get("pairwise")
    if pair:
        total = pair["results"]["overall"]
        row.update(
            baseline=pair["baseline"],
            win_rate=total["win_rate_adjusted"],
            wins=total["wins"],
            ties=total["ties"],
            losses=total["losses"],
            pair_errors=total["errors"],
        )
    return row


def rubric_rows(doc: dict[str, Any]) -> list[Row]:
    """One row per judged model in a ``rubric.json`` (the model, then its baseline when judged)."""
    rows = []
    for m in doc["models"]:
        rows.append(
            {
                "model": m["model"],
                "role": m["role"],
                **_judge_columns(doc),
                "score": m["score"],
                "score_parsed": m["score_parsed"],
                **{c: m["pass_rate"][c] for c in CRITERIA},
                "n_items": m["n_items"],
                "n_errors": m["n_errors"],
            }
        )
    return rows


def judge_lines(docs: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines naming each judge (and its caller's note, e.g. a weak-judge caveat) once."""
    seen: list[tuple[Any, Any, Any]] = []
    for d in docs:
        j = d.get("judge") or {}
        key = (j.get("model"), j.get("base_url"), j.get("note"))
        if key not in seen:
            seen.append(key)
    return [
        f"- judge: `{model}` at `{url}`" + (f". **Note:** {note}" if note else "")
        for model, url, note in seen
    ]


def _finite(groups: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {
        k: {c: float(v) for c, v in g.items() if isinstance(v, int | float) and math.isfinite(v)}
        for k, g in groups.items()
    }


def plot_judged(out_dir: Path, mt_docs: Sequence[dict[str, Any]], rubric_docs: Sequence[dict[str, Any]]):
    """The charts of the judged evaluations under ``out_dir``: MT-Bench scores by category per model
    (``mt_bench_by_category.png``), pairwise win/tie/loss per category (``mt_bench_pairwise.png``) and rubric
    pass rates per criterion (``rubric.png``). Each model's numbers are plotted once. Returns the paths."""
    from c2f_megatron.eval.plots import plot_bars, plot_win_tie_loss

    plots: list[Path] = []
    by_category: dict[str, dict[str, Any]] = {}
    games: dict[str, dict[str, dict[str, int]]] = {}
    for d in mt_docs:
        by_category.setdefault(d["model"], d.get("per_category", {}))
        base = d.get("baseline_scores")
        if base:
            by_category.setdefault(base["model"], base.get("per_category", {}))
        pair = d.get("pairwise")
        if pair:
            games[f"{d['model']} vs {pair['baseline']}"] = {
                c: {k: r[k] for k in ("wins", "ties", "losses")} for c, r in pair["results"].items()
            }
    groups = _finite(by_category)
    if any(groups.values()):
        plots.append(
            plot_bars(groups, out_dir / "mt_bench_by_category.png", "MT-Bench by category", "score (1-10)")
        )
    if games:
        plots.append(plot_win_tie_loss(games, out_dir / "mt_bench_pairwise.png", "MT-Bench pairwise games"))
    rates: dict[str, dict[str, Any]] = {}
    for d in rubric_docs:
        for m in d["models"]:
            rates.setdefault(m["model"], m["pass_rate"])
    groups = _finite(rates)
    if any(groups.values()):
        plots.append(
            plot_bars(groups, out_dir / "rubric.png", "Rubric pass rate by criterion", "pass rate", (0, 1))
        )
    return plots
