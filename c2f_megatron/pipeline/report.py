"""The pipeline's report: the Table-3-style table, pairwise RM win rates, the reward model's accuracy, the
wall time of every stage, and the plots, all under ``run_dir/report/`` (``summary.md`` ties them together).

With a judge configured, ``report/mt_bench.*`` and ``report/rubric.*`` gather every row's judged evaluations
(``eval/<row>/mt_bench.json`` and ``rubric.json``) with their charts.

Everything is read back from the stage outputs (``eval/<row>/eval.json`` and ``responses.json``, each PPO
run's ``metrics.jsonl``, the reward model's checkpoint metadata), so the report is rewritten the same way
whether the stages ran now or earlier.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from c2f_megatron.config import to_dict
from c2f_megatron.files import write_atomic
from c2f_megatron.pipeline.stages import StageFailed, gamma_of

if TYPE_CHECKING:
    from c2f_megatron.pipeline.stages import Pipeline
    from c2f_megatron.training.summary import RunSummary

RESPONSES = "responses.json"


def _eval_row(p: Pipeline, name: str) -> dict[str, Any]:
    """The table row ``c2f eval`` wrote for row ``name`` (its ``eval.json``)."""
    return dict(json.loads(Path(p.outputs[f"eval/{name}"]).read_text())["rows"][0])


def _responses(p: Pipeline, name: str) -> dict[str, Any]:
    """Row ``name``'s prompts, responses and RM scores (the ``responses.json`` beside its ``eval.json``)."""
    return json.loads((Path(p.outputs[f"eval/{name}"]).parent / RESPONSES).read_text())


def _rows(p: Pipeline) -> list[dict[str, Any]]:
    rows = []
    for name, _ in p.eval_models():
        row = _eval_row(p, name)
        row.pop("checkpoint", None)
        row.pop("model", None)
        rows.append({"model": name, "gamma": gamma_of(name), **row})
    return rows


def _judged_docs(p: Pipeline, file: str) -> list[dict[str, Any]]:
    """Each row's ``mt_bench.json`` or ``rubric.json`` (``file``), in table order, where that eval judged."""
    from c2f_megatron.eval.judged import read_doc

    docs = []
    for name, _ in p.eval_models():
        doc = read_doc(Path(p.outputs[f"eval/{name}"]).parent / file)
        if doc is not None:
            docs.append({**doc, "model": name} if "model" in doc else doc)
    return docs


def _judged_tables(p: Pipeline, out: Path, meta: Any) -> tuple[list[str], list[Path]]:
    """``report/mt_bench.*`` and ``report/rubric.*`` across the rows that were judged, their charts, and the
    summary's section naming the judge (and the caller's caveat, ``judge.note``)."""
    from c2f_megatron.eval.judged import (
        MT_BENCH_FILE,
        RUBRIC_FILE,
        judge_lines,
        mt_bench_row,
        plot_judged,
        rubric_rows,
    )
    from c2f_megatron.eval.report import write_report
    from c2f_megatron.eval.rubric import WEIGHTS_NOTE

    mt_docs, rubric_docs = _judged_docs(p, MT_BENCH_FILE), _judged_docs(p, RUBRIC_FILE)
    if not mt_docs and not rubric_docs:
        return [], []
    lines = ["## Judged evaluations", "", *judge_lines(mt_docs + rubric_docs), ""]
    if mt_docs:
        rows = [mt_bench_row(d) for d in mt_docs]
        write_report(out, "mt_bench", rows, meta)
        lines += [
            f"MT-Bench (1-10, `mt_bench.md`); `win_rate`: pairwise against `{p.partner}`, ties half.",
            "",
            _markdown_table(rows),
        ]
    if rubric_docs:
        rows = [r for d in rubric_docs for r in rubric_rows(d) if r["role"] == "model"]
        names = {r["model"] for r in rows}
        for d in rubric_docs:  # a baseline judged only as a baseline still gets its row
            for r in rubric_rows(d):
                if r["model"] not in names:
                    rows.append(r)
                    names.add(r["model"])
        write_report(out, "rubric", rows, meta)
        weights = ", ".join(f"{c} {w:g}" for c, w in rubric_docs[0]["weights"].items())
        lines += [
            "ICE-GRT rubric (`rubric.md`): pass rate per criterion over every judged response (unparsable "
            f"judgments count as failures; `n_errors`), `score` weighted by {weights}. {WEIGHTS_NOTE}",
            "",
            _markdown_table(rows),
        ]
    return lines, plot_judged(out, mt_docs, rubric_docs)


def pairwise_win_rates(p: Pipeline) -> list[dict[str, Any]]:
    """``report.pairs``: how often row a's response outscores row b's under the reward model, on the same
    held-out prompts (ties count half)."""
    from c2f_megatron.eval.response_metrics import win_rate

    out = []
    for a, b in p.cfg.report.pairs:
        docs = [_responses(p, n) for n in (a, b)]
        if docs[0]["prompts"] != docs[1]["prompts"] or None in (docs[0]["rewards"], docs[1]["rewards"]):
            raise StageFailed(f"report.pairs [{a}, {b}]: the two evals differ in prompts or have no rewards")
        rate = win_rate(docs[0]["rewards"], docs[1]["rewards"])
        out.append({"a": a, "b": b, "win_rate_a_over_b": rate, "n": len(docs[0]["rewards"])})
    return out


def reward_model_accuracy(p: Pipeline) -> dict[str, Any]:
    """The reward model's held-out pairwise accuracy (its trainer's last eval, in the checkpoint)."""
    meta = json.loads((p.outputs["rm"] / "c2f_checkpoint.json").read_text())
    ev = meta.get("extra", {}).get("eval", {})
    return {k: ev.get(k) for k in ("accuracy", "loss", "margin", "reward_mean", "reward_std", "step")}


def _ppo_histories(p: Pipeline) -> dict[str, list[dict[str, Any]]]:
    from c2f_megatron.training.summary import read_metrics_jsonl

    runs = {}
    for name in ("coarse", *(v.name for v in p.cfg.variants)):
        path = p.stage_dir_of(name) / "metrics.jsonl"
        if path.is_file():
            runs[name] = read_metrics_jsonl(path)
    return runs


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    from c2f_megatron.eval.report import RunMetadata, to_markdown

    text = to_markdown(rows, RunMetadata("", "", 0), "")
    return text.split("\n", 5)[-1]  # the table without the title and metadata lines


def write_pipeline_report(p: Pipeline) -> Path:
    """Write every report file; returns the report directory."""
    from c2f_megatron.eval.plots import plot_bars, plot_metrics_vs_gamma
    from c2f_megatron.eval.report import RunMetadata, write_report
    from c2f_megatron.training.summary import plot_ppo_curves

    out = p.run_dir / "report"
    rows = _rows(p)
    meta = RunMetadata(
        model=p.cfg.title, checkpoint=str(p.run_dir), seed=int(p.cfg.hh.seed), config=to_dict(p.cfg)
    )
    write_report(out, "table", rows, meta)
    pairs = pairwise_win_rates(p)
    if pairs:
        write_report(out, "pairwise", pairs, meta)
    stages = [{"stage": k, "seconds": v} for k, v in p.seconds.items()]
    if stages:
        write_report(out, "stages", stages, meta)
    rm = reward_model_accuracy(p)
    write_atomic(out / "reward_model.json", json.dumps(rm, indent=2) + "\n")

    plots = []
    runs = _ppo_histories(p)
    if runs:
        plots.append(plot_ppo_curves(runs, out / "ppo_curves.png"))
    sweep = [r for r in rows if r["gamma"] is not None and r["model"].startswith("gamma_")]
    if sweep:
        plots.append(
            plot_metrics_vs_gamma(
                sweep + [r for r in rows if r["gamma"] is None], out / "metrics_vs_gamma.png", p.partner
            )
        )
    by_category = {
        r["model"]: {
            k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("mmlu/") and isinstance(v, float)
        }
        for r in rows
    }
    if any(by_category.values()):
        plots.append(plot_bars(by_category, out / "mmlu_by_category.png", "MMLU by category", "accuracy"))
    if pairs:
        groups = {f"{x['a']} vs {x['b']}": {"win rate": x["win_rate_a_over_b"]} for x in pairs}
        plots.append(plot_bars(groups, out / "pairwise_win_rates.png", "RM win rate, a over b", "win rate"))

    judged_lines, judged_plots = _judged_tables(p, out, meta)
    plots += judged_plots

    total = sum(p.seconds.values())
    lines = [
        f"# {p.cfg.title}",
        "",
        f"Run directory: `{p.run_dir}`. Rows: the partner (`{p.partner}`), the Fine Actor at each gamma "
        "(`gamma_G` = G * coarse + (1 - G) * partner), the Coarse Actor, then each variant and its merges. "
        f"`win_rate` is the RM win rate against `{p.partner}` on the same held-out prompts.",
        "",
        "## Table",
        "",
        _markdown_table(rows),
        "## Reward model (held-out pairs)",
        "",
        "accuracy {}, eval loss {}, at step {}".format(
            *(_fmt(rm.get(k)) for k in ("accuracy", "loss", "step"))
        ),
        "",
    ]
    if pairs:
        lines += ["## Pairwise RM win rates", "", _markdown_table(pairs)]
    lines += judged_lines
    lines += [
        f"## Wall time per stage ({total / 60:.1f} min in all)",
        "",
        _markdown_table(stages) if stages else "",
    ]
    lines += ["## Plots", ""] + [f"![{q.stem}]({q.name})" for q in plots] + [""]
    write_atomic(out / "summary.md", "\n".join(lines))
    return out


def run_summary(p: Pipeline, seconds: float, report: Path) -> RunSummary:
    """The run's summary block (also ``run_dir/summary.md``): stages and outputs, the Coarse Actor's first
    and last iteration, and the ``report.before_after`` rows' metrics and first answers side by side."""
    from c2f_megatron.data.chat import last_user_turn
    from c2f_megatron.training.summary import RunSummary, Sample, read_metrics_jsonl, start_end

    ran = f"{len(p.ran)} stage(s) run" + (f", {len(p.skipped)} done earlier" if p.skipped else "")
    summary = RunSummary("pipeline", p.run_dir, seconds, ran, columns=("start/before", "end/after"))
    summary.outputs = {"report": str(report / "summary.md"), "summary": str(p.run_dir / "summary.md")}
    for table in ("mt_bench", "rubric"):
        if (report / f"{table}.md").is_file():
            summary.outputs[f"{table} table"] = str(report / f"{table}.md")
    for name in ("base", "rm", "coarse", "merge"):
        if name in p.outputs:
            summary.outputs[name] = str(p.outputs[name])
    summary.outputs["stage logs"] = str(p.run_dir / "*" / "stage.log")
    summary.outputs["stage times"] = ", ".join(f"{k} {v:.0f} s" for k, v in p.seconds.items())
    coarse = p.stage_dir_of("coarse") / "metrics.jsonl"
    if coarse.is_file():
        keys = ("reward_raw_mean", "vf_loss", "response_length_mean", "rollout_length_limit")
        rows = start_end(read_metrics_jsonl(coarse, "train"), keys)
        summary.metrics += [(f"coarse {k} (first -> last iteration)", a, b) for k, a, b in rows]
    if p.cfg.report.before_after:
        before, after = p.cfg.report.before_after
        docs = {name: _responses(p, name) for name in (before, after)}
        table = {name: _eval_row(p, name) for name in (before, after)}
        for key in ("reward_mean", "length_mean", "eos_fraction", "redundancy", "win_rate"):
            a, b = (table[n].get(key) for n in (before, after))
            if isinstance(a, int | float) or isinstance(b, int | float):
                summary.metrics.append((f"{key} ({before} -> {after})", a, b))
        for i in range(min(p.cfg.report.samples, len(docs[before]["prompts"]))):
            prompt = last_user_turn(docs[before]["prompts"][i])
            for j, name in enumerate((before, after)):
                d = docs[name]
                score = f", RM {d['rewards'][i]:.2f}" if d.get("rewards") else ""
                title = f"prompt {i + 1}, {name} ({len(d['response_ids'][i])} tokens{score})"
                summary.samples.append(Sample(title, prompt if j == 0 else "", d["responses"][i]))
    return summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return "n/a" if value is None else str(value)
