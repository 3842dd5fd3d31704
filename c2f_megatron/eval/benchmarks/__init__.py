"""General benchmarks in their standard few-shot formats, scored through the ``LanguageModel`` protocol.

Multiple choice (MMLU 5-shot, ARC-Easy/Challenge 1-shot, WinoGrande 1-shot, AGIEval few-shot) is scored by
the argmax of summed log-likelihoods over the choices (optionally divided by the continuation's character
length, "acc_norm"); ties go to the first choice. Generation benchmarks (BBH 3-shot CoT, GSM8K 8-shot CoT)
are scored by exact match after ``extraction``. Records come from the local ``shared/data`` files (formats in
its README) or, with ``source="hub"``, from Hugging Face ``datasets`` names.

Selection: ``limit`` items are drawn uniformly without replacement over the whole benchmark (all subtasks
pooled) with ``random.Random(seed)``, then kept in file order (``select_indices``). The reported value is the
micro-average over evaluated items; ``subtasks`` and ``macro`` give the per-subtask view.

Few-shot sources: MMLU uses the 5 dev rows of the subject; ARC and WinoGrande (no train split here) use one
other item of the same file, drawn per item from ``(seed, index)``; AGIEval uses every demonstration of the
task in few_shot_prompts.csv in the official "few-shot" (no CoT) format, without the official 2048-token
truncation; BBH uses the official 3-shot CoT prompt; GSM8K the 8 Wei et al. exemplars below.

Not supported: AGIEval cloze tasks (math, gaokao-mathcloze) and multi-answer tasks (jec-qa-ca, jec-qa-kd;
multi-answer rows of gaokao-physics are skipped); AGIEval from the hub; BBH prompts from the hub (the CoT
prompt files are always read locally); HellaSwag/RACE (no data).
"""

from __future__ import annotations

from pathlib import Path

from c2f_megatron.eval.benchmarks.items import (
    BenchmarkDataError,
    BenchmarkResult,
    GenerationItem,
    ItemOutcome,
    MultipleChoiceItem,
    Source,
    read_jsonl,
    require_field,
    select_indices,
)
from c2f_megatron.eval.benchmarks.knowledge import (
    AGIEVAL_DEFAULT,
    MMLU_CATEGORIES,
    MMLU_CATEGORY_OF,
    MMLU_SHOTS,
    agieval_demos,
    agieval_items,
    arc_items,
    mmlu_items,
    winogrande_items,
)
from c2f_megatron.eval.benchmarks.reasoning import (
    BBH_MAX_NEW_TOKENS,
    BBH_STOP,
    GSM8K_MAX_NEW_TOKENS,
    GSM8K_STOP,
    bbh_items,
    bbh_tasks,
    gsm8k_items,
)
from c2f_megatron.eval.benchmarks.scoring import score_generation, score_multiple_choice, summarize
from c2f_megatron.eval.protocol import LanguageModel

# ----------------------------------------------------------------------------------------------- entry point

__all__ = [
    "AGIEVAL_DEFAULT",
    "BBH_MAX_NEW_TOKENS",
    "BBH_STOP",
    "BENCHMARKS",
    "BenchmarkDataError",
    "BenchmarkResult",
    "GSM8K_MAX_NEW_TOKENS",
    "GSM8K_STOP",
    "GenerationItem",
    "ItemOutcome",
    "MMLU_CATEGORIES",
    "MMLU_CATEGORY_OF",
    "MMLU_SHOTS",
    "MultipleChoiceItem",
    "Source",
    "agieval_demos",
    "agieval_items",
    "arc_items",
    "bbh_items",
    "bbh_tasks",
    "evaluate_benchmark",
    "gsm8k_items",
    "mmlu_items",
    "parse_benchmark_name",
    "read_jsonl",
    "require_field",
    "score_generation",
    "score_multiple_choice",
    "select_indices",
    "summarize",
    "winogrande_items",
]

BENCHMARKS = ("mmlu", "arc_easy", "arc_challenge", "winogrande", "agieval", "bbh", "gsm8k")
WITH_SUBTASKS = ("mmlu", "agieval", "bbh")


def parse_benchmark_name(name: str) -> tuple[str, list[str] | None]:
    """``"bbh:navigate,snarks"`` -> ``("bbh", ["navigate", "snarks"])``; an unknown benchmark, or subtasks of
    one without them, raise ``ValueError`` (config load checks ``benchmarks.names`` with this)."""
    base, _, sub = name.partition(":")
    subtasks = [s for s in sub.split(",") if s] or None
    if base not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)} (optionally ':subtask')"
        )
    if subtasks and base not in WITH_SUBTASKS:
        raise ValueError(f"benchmark {base!r} has no subtasks (got {name!r})")
    return base, subtasks


def evaluate_benchmark(
    name: str,
    model: LanguageModel,
    limit: int | None = None,
    seed: int = 0,
    *,
    data_dir: Path | str | None = None,
    source: Source = "local",
    length_normalized: bool = False,
    batch_size: int = 32,
    mmlu_shots: int = MMLU_SHOTS,
    mmlu_cloze: bool = False,
    max_new_tokens: int | None = None,
) -> BenchmarkResult:
    """Evaluate one benchmark; ``name`` is one of ``BENCHMARKS`` or "mmlu:<subject>", "agieval:<task>",
    "bbh:<task>" (comma-separated subtasks allowed) to restrict it. MMLU reports its categories too.
    ``max_new_tokens`` caps BBH's and GSM8K's generations below their standard 512 / 256 (a budget)."""
    base, subtasks = parse_benchmark_name(name)
    ddir = Path(data_dir) if data_dir is not None else None
    metric = "acc_norm" if length_normalized else "acc"
    if base == "mmlu":
        mc = mmlu_items(ddir, source, subtasks, limit, seed, mmlu_shots, mmlu_cloze)
        outcomes = score_multiple_choice(mc, model, length_normalized, batch_size)
        return summarize(name, metric, outcomes, MMLU_CATEGORY_OF)
    elif base in ("arc_easy", "arc_challenge"):
        mc = arc_items(ddir, source, "easy" if base == "arc_easy" else "challenge", limit, seed)
    elif base == "winogrande":
        mc = winogrande_items(ddir, source, limit, seed)
    elif base == "agieval":
        mc = agieval_items(ddir, source, subtasks or list(AGIEVAL_DEFAULT), limit, seed)
    elif base == "bbh":
        items = bbh_items(ddir, source, subtasks or bbh_tasks(ddir), limit, seed)
        new = min(BBH_MAX_NEW_TOKENS, max_new_tokens or BBH_MAX_NEW_TOKENS)
        return summarize(name, "exact_match", score_generation(items, model, new, BBH_STOP, batch_size))
    else:
        items = gsm8k_items(ddir, source, limit, seed)
        new = min(GSM8K_MAX_NEW_TOKENS, max_new_tokens or GSM8K_MAX_NEW_TOKENS)
        return summarize(name, "exact_match", score_generation(items, model, new, GSM8K_STOP, batch_size))
    return summarize(name, metric, score_multiple_choice(mc, model, length_normalized, batch_size))
