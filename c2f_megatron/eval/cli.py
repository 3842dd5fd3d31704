"""``c2f eval [CONFIG] [key.path=value ...] [--checkpoint DIR --rm DIR --baseline DIR --out DIR]``.

Evaluates one model and writes one table (``<out_dir>/<report_name>.{md,csv,json}``, one row) with the
model, checkpoint, seed and resolved config recorded, plus ``responses.json`` (the generated responses and
their rewards, reusable as another run's ``baseline``) and, when run, ``benchmarks.*``, the judged
evaluations ``mt_bench.json`` (single grades; pairwise games against ``baseline``) and ``rubric.json``
(ICE-GRT's 8 criteria on the held-out responses), with their PNG charts. The report's JSON is written
last, so its presence means the run finished.

Launch one process per model-parallel rank (``torchrun --nproc_per_node=TP*PP -m c2f_megatron.cli eval``);
every rank runs the models, rank 0 writes. Exit codes: 0 done, 2 bad config or input.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from c2f_megatron.config import ConfigError, help_kwargs, load_config, to_dict
from c2f_megatron.eval.config import EvalConfig

RESPONSES_FILE = "responses.json"
FLAG_FIELDS = ("checkpoint", "rm", "baseline", "name", "tokenizer", "out_dir")


def register(subparsers: Any) -> None:
    help_text = "evaluate a checkpoint: response metrics, benchmarks, MT-Bench"
    parser = subparsers.add_parser(
        "eval",
        help=help_text,
        description=__doc__.split("\n\n")[0],
        **help_kwargs(EvalConfig),
    )
    parser.add_argument("config", nargs="?", help="eval YAML (optional: defaults + overrides/flags)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. responses.num_prompts=8")
    parser.add_argument("--checkpoint", help="model: c2f checkpoint, training root or HF directory")
    parser.add_argument("--rm", help="reward model (value checkpoint or root)")
    parser.add_argument("--baseline", help="win-rate baseline: checkpoint or an earlier eval output dir")
    parser.add_argument("--name", help="row label (default: the checkpoint directory's name)")
    parser.add_argument("--tokenizer", help="tokenizer spec (default: Mistral v0.1)")
    parser.add_argument("--out", dest="out_dir", help="output directory")
    parser.set_defaults(func=_run_args)


def _run_args(args: argparse.Namespace) -> int:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # `c2f eval checkpoint=...` without a YAML
        config, overrides = None, [config, *overrides]
    flags = [f"{k}={getattr(args, k)}" for k in FLAG_FIELDS if getattr(args, k) is not None]
    return main(config, overrides + flags)


def main(config_path: str | None, overrides: list[str]) -> int:
    try:
        cfg = load_config(EvalConfig, config_path, overrides)
        if not cfg.checkpoint:
            raise ConfigError(
                f"{config_path or 'defaults'}: field 'checkpoint' is required (or --checkpoint)"
            )
    except ConfigError as exc:
        print(f"c2f eval: {exc}", file=sys.stderr)
        return 2
    from c2f_megatron.checkpoint.megatron_dir import CheckpointError
    from c2f_megatron.eval.benchmarks import BenchmarkDataError
    from c2f_megatron.eval.judge_client import JudgeAPIError
    from c2f_megatron.eval.mt_bench import MTBenchDataError
    from c2f_megatron.platform.distributed import init_distributed

    init_distributed(cfg.parallel)
    try:
        run_eval(cfg)
    except (ConfigError, CheckpointError, BenchmarkDataError, MTBenchDataError, OSError) as exc:
        print(f"c2f eval: {exc}", file=sys.stderr)
        return 2
    except (JudgeAPIError, ValueError) as exc:
        print(f"c2f eval: {exc}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------ inputs


def prepare_checkpoint(path: str, cfg: EvalConfig, role: str) -> Path:
    """The c2f checkpoint to load for ``path``; an HF directory is converted once under ``out_dir``."""
    from c2f_megatron.checkpoint.resolve import checkpoint_or_converted

    par = cfg.parallel
    return checkpoint_or_converted(
        path,
        role,
        Path(cfg.out_dir) / "converted",
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
    )


@dataclass
class HeldOut:
    """Tokenised held-out data: prompts to answer, and chosen responses (split as context/continuation)."""

    prompt_texts: list[str]
    prompt_ids: list[list[int]]
    ref_contexts: list[list[int]]
    ref_continuations: list[list[int]]


def load_held_out(cfg: EvalConfig, tokenizer: Any) -> HeldOut:
    from c2f_megatron.data import (
        SKIPPED_RECORDS_FILE,
        ChatFormat,
        encode_prompts,
        load_from_config,
        prompts_for_rl,
    )
    from c2f_megatron.training.tasks.sft import tokenize_pairs

    rc = cfg.responses
    data = load_from_config(rc.hh, Path(cfg.out_dir) / SKIPPED_RECORDS_FILE)
    if not data.eval:
        raise ConfigError(f"responses.hh: source {rc.hh.source} gives no held-out pairs (eval_fraction)")
    chat = ChatFormat(rc.hh.prompt_format, tokenizer)
    stops = [tokenizer.eos_id, tokenizer.pad_id]
    prompts = encode_prompts(chat, prompts_for_rl(data.eval, chat), stops, rc.max_prompt_length, rc.overlong)[
        : rc.num_prompts
    ]
    refs = tokenize_pairs(data.eval[: rc.num_references], chat, rc.max_reference_length - 1)
    return HeldOut(
        [text for text, _ in prompts],
        [ids for _, ids in prompts],
        [list(r.ids[: r.prompt_len]) for r in refs],
        [list(r.ids[r.prompt_len :]) for r in refs],
    )


# ------------------------------------------------------------------------------------------ running


class PhaseTimer:
    """Wall seconds of each evaluation phase (``timings.json``), each logged as it ends."""

    def __init__(self, log: bool):
        self.log = log
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def start(self, name: str) -> None:
        self._started[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self._started.pop(name), 2)
        if self.log:
            print(f"c2f eval: {name} took {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.start(name)
        yield
        self.stop(name)


def _generate(model: Any, held: HeldOut, cfg: EvalConfig) -> list[list[int]]:
    from c2f_megatron.eval.lm import Sampling

    rc = cfg.responses
    sampling = Sampling(rc.greedy, rc.temperature, rc.top_k, rc.top_p)
    return model.generate_ids(held.prompt_ids, rc.max_new_tokens, sampling)


def _load_baseline_responses(path: Path, held: HeldOut, rm: Path | None) -> dict[str, Any]:
    """Responses of an earlier eval run; refuses different prompts, or (when this run scores with a reward
    model) responses scored by another one."""
    doc = json.loads((path / RESPONSES_FILE).read_text())
    if doc.get("prompts") != held.prompt_texts:
        raise ConfigError(
            f"{path / RESPONSES_FILE}: field 'prompts' differs from this run's held-out prompts; evaluate the "
            "baseline with the same responses.hh / num_prompts settings"
        )
    if rm is not None and (doc.get("rm") != str(rm) or doc.get("rewards") is None):
        raise ConfigError(
            f"{path / RESPONSES_FILE}: field 'rm' is {doc.get('rm')!r}, this run scores with {rm}; "
            "win rates need both sides scored by the same reward model"
        )
    return doc


def _is_eval_dir(path: Path) -> bool:
    """An earlier ``c2f eval`` output directory (reused as the baseline), not a checkpoint."""
    from c2f_megatron.eval.judged import MT_BENCH_FILE

    return (path / RESPONSES_FILE).is_file() or (path / MT_BENCH_FILE).is_file()


def _mt_bench_questions(cfg: EvalConfig) -> list[Any] | None:
    """The MT-Bench questions to answer, or None when MT-Bench is off (disabled or no judge configured)."""
    from c2f_megatron.eval import mt_bench as mt

    if not cfg.mt_bench.enabled or cfg.judge.resolved_base_url() is None:
        return None
    return mt.select_questions(
        mt.load_questions(cfg.mt_bench.questions), cfg.mt_bench.per_category, cfg.mt_bench.limit
    )


def _mt_bench_answers(model: Any, cfg: EvalConfig, questions: list[Any]) -> dict[int, tuple[str, str]]:
    """Two-turn answers on every rank (the model is sharded): all turn-1 prompts in one batch, then turn 2."""
    from c2f_megatron.data import ChatFormat
    from c2f_megatron.eval import mt_bench as mt

    chat = ChatFormat(cfg.responses.hh.prompt_format, model.tokenizer)
    return mt.generate_answers(questions, mt.model_responder(model, chat, cfg.mt_bench.max_new_tokens))


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t != tokenizer.eos_id])


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Run every configured evaluation (all ranks); rank 0 writes the outputs. Returns the table row."""
    started = time.time()
    from c2f_megatron.data import load_tokenizer
    from c2f_megatron.eval import mt_bench as mt
    from c2f_megatron.eval import response_metrics as rm_metrics
    from c2f_megatron.eval.benchmarks import evaluate_benchmark
    from c2f_megatron.eval.hf_model import HFLanguageModel
    from c2f_megatron.eval.judge_client import OpenAIChatClient
    from c2f_megatron.eval.judged import (
        MT_BENCH_FILE,
        RUBRIC_FILE,
        mt_bench_doc,
        plot_judged,
        reusable_rubric,
        rubric_doc,
    )
    from c2f_megatron.eval.lm import TokenLM
    from c2f_megatron.eval.megatron_model import MegatronLM, RewardScorer
    from c2f_megatron.eval.report import RunMetadata, benchmark_rows, write_report
    from c2f_megatron.files import write_atomic
    from c2f_megatron.platform.distributed import is_rank_zero

    assert cfg.checkpoint is not None
    out_dir = Path(cfg.out_dir)
    rank_zero = is_rank_zero()
    tokenizer = load_tokenizer(cfg.tokenizer)
    rm_ckpt = prepare_checkpoint(cfg.rm, cfg, "reward") if cfg.rm else None
    name = cfg.name or Path(cfg.checkpoint).name

    def load_lm(path: str) -> tuple[TokenLM, Path]:
        if cfg.backend == "hf":
            from c2f_megatron.checkpoint.hf_dir import is_hf_directory

            if not is_hf_directory(Path(path)):
                raise ConfigError(f"backend hf: {path} is not a Hugging Face directory (config.json)")
            return HFLanguageModel(path, tokenizer, cfg.batch_size), Path(path)
        ckpt = prepare_checkpoint(path, cfg, "actor")
        return MegatronLM.from_checkpoint(ckpt, tokenizer, cfg.batch_size, cfg.seed, cfg.layer_spec), ckpt

    timed = PhaseTimer(rank_zero)
    with timed("load"):
        policy, ckpt = load_lm(cfg.checkpoint)
    row: dict[str, Any] = {"model": name, "checkpoint": str(ckpt)}
    held = load_held_out(cfg, tokenizer) if cfg.responses.enabled else None
    responses: list[list[int]] = []
    if held is not None:
        with timed("responses"):
            responses = _generate(policy, held, cfg)
        if held.ref_continuations:
            with timed("perplexity"):
                row["perplexity"] = rm_metrics.perplexity(
                    policy.token_logprobs(held.ref_contexts, held.ref_continuations)
                )
    bench_results = []
    for b in cfg.benchmarks.names:
        with timed(b):
            bench_results.append(
                evaluate_benchmark(
                    b,
                    policy,
                    cfg.benchmarks.limits.get(b, cfg.benchmarks.limit),
                    cfg.seed,
                    data_dir=cfg.benchmarks.data_dir,
                    source=cfg.benchmarks.source,
                    length_normalized=cfg.benchmarks.length_normalized,
                    batch_size=cfg.batch_size,
                    mmlu_shots=cfg.benchmarks.mmlu_shots,
                    mmlu_cloze=cfg.benchmarks.mmlu_cloze,
                    max_new_tokens=cfg.benchmarks.max_new_tokens,
                )
            )
    questions = _mt_bench_questions(cfg)
    mt_answers = base_mt_answers = base_mt_doc = None
    if questions is not None:
        with timed("mt_bench answers"):
            mt_answers = _mt_bench_answers(policy, cfg, questions)
    del policy
    gc.collect()

    rewards = baseline_rewards = None
    baseline_doc: dict[str, Any] | None = None
    base_name = None
    pairwise = questions is not None and cfg.mt_bench.pairwise and bool(cfg.baseline)
    if cfg.baseline and (held is not None or pairwise):
        base_path = Path(cfg.baseline)
        base_name = base_path.name
        if _is_eval_dir(base_path):
            if held is not None:
                baseline_doc = _load_baseline_responses(base_path, held, rm_ckpt)
                baseline_rewards = baseline_doc.get("rewards")
                base_name = baseline_doc.get("model") or base_name
            if pairwise:
                if not (base_path / MT_BENCH_FILE).is_file():
                    raise ConfigError(
                        f"baseline {base_path}: no {MT_BENCH_FILE} for the pairwise games; run its eval "
                        "with the judge too, or set mt_bench.pairwise=false"
                    )
                base_mt_answers = mt.load_answers(base_path / MT_BENCH_FILE, questions)
                base_mt_doc = json.loads((base_path / MT_BENCH_FILE).read_text())
                base_name = base_mt_doc.get("model") or base_name
        else:
            baseline, _ = load_lm(cfg.baseline)
            if held is not None:
                with timed("baseline responses"):
                    baseline_doc = {"response_ids": _generate(baseline, held, cfg)}
            if pairwise:
                with timed("baseline mt_bench answers"):
                    base_mt_answers = _mt_bench_answers(baseline, cfg, questions)
            del baseline
            gc.collect()
    if held is not None and rm_ckpt is not None:
        timed.start("rewards")
        scorer = RewardScorer.from_checkpoint(rm_ckpt, tokenizer, cfg.batch_size, cfg.layer_spec)
        rewards = scorer.score([p + r for p, r in zip(held.prompt_ids, responses)])
        if baseline_doc is not None and baseline_rewards is None:
            baseline_rewards = scorer.score(
                [p + r for p, r in zip(held.prompt_ids, baseline_doc["response_ids"])]
            )
        del scorer
        gc.collect()
        timed.stop("rewards")

    if held is not None:
        m = rm_metrics.response_metrics(responses, tokenizer.eos_id, rewards, cfg.responses.redundancy_n)
        row.update(
            n_prompts=len(responses),
            reward_mean=m.reward.mean if m.reward else None,
            reward_stderr=m.reward.stderr if m.reward else None,
            win_rate=rm_metrics.win_rate(rewards, baseline_rewards) if rewards and baseline_rewards else None,
            length_mean=m.length.mean,
            length_stderr=m.length.stderr,
            eos_fraction=m.eos_fraction,
            redundancy=m.redundancy.mean,
            distinct_1=m.distinct_1,
            distinct_2=m.distinct_2,
        )
        row["perplexity"] = row.pop("perplexity", None)
    for r in bench_results:
        row[r.name] = r.value
        for category, value in r.categories.items():
            row[f"{r.name}/{category}"] = value
    judged_docs: dict[str, dict[str, Any]] = {}
    judge_on = cfg.judge.resolved_base_url() is not None
    if rank_zero and judge_on:
        client = OpenAIChatClient(cfg.judge.client_config())
        if questions is not None and mt_answers is not None:
            base = (base_name, base_mt_answers, base_mt_doc) if base_mt_answers is not None else None
            with timed("mt_bench judging"):
                mt_doc = mt_bench_doc(cfg, client, name, questions, mt_answers, base)
            judged_docs[MT_BENCH_FILE] = mt_doc
            row["mt_bench"] = mt_doc["overall"]
            if "pairwise" in mt_doc:
                row["mt_bench_win_rate"] = mt_doc["pairwise"]["results"]["overall"]["win_rate_adjusted"]
        if held is not None and cfg.rubric.enabled:
            texts = [_decode(tokenizer, r) for r in responses]
            sides = [(name, "model", held.prompt_texts, texts, None)]
            if baseline_doc is not None:
                reuse = None
                if "responses" in baseline_doc:  # an earlier eval dir
                    texts = baseline_doc["responses"]
                    reuse = reusable_rubric(Path(cfg.baseline), cfg)
                else:
                    texts = [_decode(tokenizer, r) for r in baseline_doc["response_ids"]]
                sides.append((base_name or "baseline", "baseline", held.prompt_texts, texts, reuse))
            with timed("rubric judging"):
                judged_docs[RUBRIC_FILE] = rubric_doc(cfg, client, sides)
            model_scores = judged_docs[RUBRIC_FILE]["models"][0]
            row["rubric_score"] = model_scores["score"]
            row.update({f"rubric/{c}": v for c, v in model_scores["pass_rate"].items()})

    if rank_zero:
        for file, judged in judged_docs.items():
            write_atomic(out_dir / file, json.dumps(judged, indent=2, default=str) + "\n")
        charts = plot_judged(
            out_dir,
            [judged_docs[MT_BENCH_FILE]] if MT_BENCH_FILE in judged_docs else [],
            [judged_docs[RUBRIC_FILE]] if RUBRIC_FILE in judged_docs else [],
        )
        judged_files = {f: str(out_dir / f) for f in judged_docs} | {c.name: str(c) for c in charts}
        if held is not None:
            doc = {
                "model": name,
                "checkpoint": str(ckpt),
                "rm": str(rm_ckpt) if rm_ckpt else None,
                "prompts": held.prompt_texts,
                "responses": [_decode(tokenizer, r) for r in responses],
                "response_ids": responses,
                "rewards": rewards,
            }
            write_atomic(out_dir / RESPONSES_FILE, json.dumps(doc, ensure_ascii=False) + "\n")
        meta = RunMetadata(model=name, checkpoint=str(ckpt), seed=cfg.seed, config=to_dict(cfg))
        if bench_results:
            write_report(out_dir, "benchmarks", benchmark_rows(bench_results), meta)
        write_atomic(out_dir / "timings.json", json.dumps(timed.seconds, indent=2) + "\n")
        write_report(out_dir, cfg.report_name, [row], meta)
        summary_responses = doc if held is not None else None
        _summary(name, out_dir, row, summary_responses, time.time() - started, cfg, judged_files)
    return row


def _summary(
    name: str,
    out_dir: Path,
    row: dict,
    responses: dict | None,
    seconds: float,
    cfg: EvalConfig,
    judged: dict[str, str],
):
    """The eval's summary block and ``out_dir/summary.md``: its files (judged outputs and charts
    included), the row's numbers, two responses."""
    from c2f_megatron.training.summary import RunSummary, Sample

    summary = RunSummary(f"eval {name}", out_dir, seconds, f"{row.get('n_prompts', 0)} prompts")
    summary.outputs = {
        "table": str(out_dir / f"{cfg.report_name}.json"),
        "timings": str(out_dir / "timings.json"),
    }
    if responses is not None:
        summary.outputs["responses"] = str(out_dir / RESPONSES_FILE)
    summary.outputs.update(judged)
    summary.outputs["summary"] = str(out_dir / "summary.md")
    summary.metrics = [(k, None, v) for k, v in row.items() if isinstance(v, int | float) and "/" not in k]
    for i in range(min(2, len(responses["responses"]) if responses else 0)):
        summary.samples.append(
            Sample(f"response {i + 1}", responses["prompts"][i], responses["responses"][i])
        )
    summary.finish()
