"""``c2f pipeline CONFIG [key.path=value ...]``: the whole C2F recipe, one resumable stage at a time.

    base (train-lm on the HH train split, unless base.pretrained is given) -> sft -> rm -> coarse (PPO with
    the CM length limit) -> merge (Fine Actor sweep over gamma) -> eval (sft, each gamma, coarse) -> report

Each stage runs as its own process (``c2f <command> run_dir/<stage>/job.yaml``, under torchrun when
``nproc > 1``), so torch.distributed state never leaks between stages and a crash is contained. A stage
is done when ``run_dir/<stage>/stage.json`` exists; that marker is written (atomically) only after the
stage's command exited 0, so rerunning the same command after a crash skips finished stages and resumes
at the one that failed (trainers additionally resume from their own step checkpoints). Stage sections hold
the job config of their command (the trainers' YAML schema); the pipeline fills in the paths that chain
the stages (init checkpoints, reward model, output dirs) and the shared ``hh`` data and ``tokenizer``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from c2f_megatron.config import ConfigError, from_dict, load_config, to_dict
from c2f_megatron.data.hh_rlhf import HHDataConfig

logger = logging.getLogger(__name__)

MARKER = "stage.json"


@dataclass
class StageSection:
    """One trainer/eval stage: its job config (``job``, that command's YAML schema) and processes."""

    job: dict[str, Any] = field(default_factory=dict)
    nproc: int = 1


@dataclass
class BaseSection(StageSection):
    """``pretrained``: a c2f checkpoint, training root or HF Mistral directory used as the base model;
    null trains one with ``c2f train-lm`` on the text of the HH train split."""

    pretrained: str | None = None


@dataclass
class MergeSection:
    gammas: str = "0.0:1.0:0.1"  # c2f merge --gamma syntax
    nproc: int = 1


@dataclass
class PipelineConfig:
    run_dir: str = "runs/pipeline"
    title: str = "C2F pipeline"
    tokenizer: str | None = None  # load_tokenizer spec shared by every stage; None = Mistral v0.1
    hh: HHDataConfig = field(default_factory=HHDataConfig)
    base: BaseSection = field(default_factory=BaseSection)
    sft: StageSection = field(default_factory=StageSection)
    rm: StageSection = field(default_factory=StageSection)
    coarse: StageSection = field(default_factory=StageSection)
    merge: MergeSection = field(default_factory=MergeSection)
    eval: StageSection = field(default_factory=StageSection)

    def __post_init__(self) -> None:
        for name in ("base", "sft", "rm", "coarse", "merge", "eval"):
            if getattr(self, name).nproc < 1:
                raise ValueError(f"{name}.nproc must be >= 1, got {getattr(self, name).nproc}")


class StageFailed(RuntimeError):
    """A stage's command failed; the message names the stage and its log."""


# ------------------------------------------------------------------------------------------ commands


Runner = Callable[[list[str], int, Path], None]


def c2f_command(args: list[str], nproc: int) -> list[str]:
    """``python -m c2f_megatron.cli ARGS``, under torchrun for more than one process."""
    if nproc == 1:
        return [sys.executable, "-m", "c2f_megatron.cli", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # single node, a free rendezvous port
        f"--nproc_per_node={nproc}",
        "-m",
        "c2f_megatron.cli",
        *args,
    ]


def subprocess_runner(args: list[str], nproc: int, log_path: Path) -> None:
    """Run one stage command with its output appended to ``log_path``; raise ``StageFailed`` on failure."""
    cmd = c2f_command(args, nproc)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise StageFailed(f"command `c2f {' '.join(args)}` exited {rc}; log {log_path}:\n" + "\n".join(tail))


# ------------------------------------------------------------------------------------------ helpers


def _write_atomic(path: Path, text: str) -> None:
    from c2f_megatron.eval.report import write_atomic

    write_atomic(path, text)


def _set(mapping: dict[str, Any], dotted: str, value: Any) -> None:
    node = mapping
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


@dataclass
class Stage:
    """A named step; ``run`` does the work and returns the stage's output path."""

    name: str
    run: Callable[[], Path]


class Pipeline:
    """Builds the stage list from a ``PipelineConfig`` and runs it, skipping stages with a marker."""

    def __init__(self, cfg: PipelineConfig, runner: Runner = subprocess_runner, config_dump: Any = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.runner = runner
        self.outputs: dict[str, Path] = {}
        self.config_dump = config_dump
        self.ran: list[str] = []
        self.skipped: list[str] = []

    # ----------------------------------------------------------------------------------- job configs

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def _job(self, section: StageSection, name: str) -> dict[str, Any]:
        job = copy.deepcopy(section.job)
        _set(job, "checkpoint.dir", str(self.stage_dir(name) / "checkpoints"))
        _set(job, "logging.run_dir", str(self.stage_dir(name)))
        return job

    def _shared_data(self, job: dict[str, Any]) -> None:
        _set(job, "data.hh", to_dict(self.cfg.hh))
        _set(job, "data.tokenizer", self.cfg.tokenizer)

    def base_job(self) -> dict[str, Any]:
        job = self._job(self.cfg.base, "base")
        _set(job, "data.paths", [str(self.stage_dir("base") / "corpus.jsonl")])
        _set(job, "data.text_field", "text")
        _set(job, "data.tokenizer", self.cfg.tokenizer)
        return job

    def sft_job(self, base: Path) -> dict[str, Any]:
        job = self._job(self.cfg.sft, "sft")
        self._shared_data(job)
        _set(job, "checkpoint.init_from", str(base))
        return job

    def rm_job(self, sft: Path) -> dict[str, Any]:
        job = self._job(self.cfg.rm, "rm")
        self._shared_data(job)
        _set(job, "checkpoint.init_from", str(sft))  # backbone from the SFT model, fresh scalar head
        return job

    def coarse_job(self, sft: Path, rm: Path) -> dict[str, Any]:
        job = self._job(self.cfg.coarse, "coarse")
        self._shared_data(job)
        _set(job, "actor.init_from", str(sft))
        _set(job, "reward.kind", "model")
        _set(job, "reward.path", str(rm))
        return job

    def eval_job(self, name: str, ckpt: Path, rm: Path, baseline: Path | None) -> dict[str, Any]:
        job = copy.deepcopy(self.cfg.eval.job)
        job.update(
            checkpoint=str(ckpt),
            name=name,
            rm=str(rm),
            baseline=str(baseline) if baseline else None,
            tokenizer=self.cfg.tokenizer,
            out_dir=str(self.stage_dir(f"eval/{name}")),
            report_name="eval",
        )
        _set(job, "responses.hh", to_dict(self.cfg.hh))
        return job

    def validate(self) -> None:
        """Load every stage's job config (with placeholder paths) so a typo fails before any training."""
        from c2f_megatron.eval.config import EvalConfig
        from c2f_megatron.rl.config import PPOJobConfig
        from c2f_megatron.training.tasks.lm import LMJobConfig
        from c2f_megatron.training.tasks.reward import RMJobConfig
        from c2f_megatron.training.tasks.sft import SFTJobConfig

        ph = self.run_dir / "placeholder"
        jobs = [
            ("sft.job", SFTJobConfig, self.sft_job(ph)),
            ("rm.job", RMJobConfig, self.rm_job(ph)),
            ("coarse.job", PPOJobConfig, self.coarse_job(ph, ph)),
            ("eval.job", EvalConfig, self.eval_job("x", ph, ph, ph)),
        ]
        if self.cfg.base.pretrained is None:
            jobs.insert(0, ("base.job", LMJobConfig, self.base_job()))
        for where, cls, job in jobs:
            from_dict(cls, job, where=f"pipeline config {where}")
        from c2f_megatron.merge.gamma import parse_gammas

        try:
            parse_gammas(self.cfg.merge.gammas)
        except ValueError as exc:
            raise ConfigError(f"pipeline config merge.gammas: {exc}") from exc

    # ----------------------------------------------------------------------------------------- stages

    def _run_job(self, name: str, command: str, job: dict[str, Any], nproc: int) -> None:
        job_path = self.stage_dir(name) / "job.yaml"
        _write_atomic(job_path, yaml.safe_dump(job, sort_keys=False))
        self.runner([command, str(job_path)], nproc, self.stage_dir(name) / "stage.log")

    def _latest(self, name: str, role: str | None = None) -> Path:
        from c2f_megatron.training.checkpointing import latest_checkpoint

        root = self.stage_dir(name) / "checkpoints"
        latest = latest_checkpoint(root)
        if latest is None:
            raise StageFailed(f"stage {name}: finished but {root} holds no complete step checkpoint")
        return latest / role if role else latest

    def _base(self) -> Path:
        pretrained = self.cfg.base.pretrained
        if pretrained is not None:
            return self._pretrained(Path(pretrained))
        self._write_corpus(self.stage_dir("base") / "corpus.jsonl")
        self._run_job("base", "train-lm", self.base_job(), self.cfg.base.nproc)
        return self._latest("base")

    def _pretrained(self, path: Path) -> Path:
        from c2f_megatron.eval.cli import is_hf_directory
        from c2f_megatron.eval.megatron_model import resolve_checkpoint

        if path.is_dir() and is_hf_directory(path):
            out = self.stage_dir("base") / "converted"
            args = ["convert", "hf-to-megatron", "--hf-dir", str(path), "--out", str(out), "--force"]
            self.runner(args, 1, self.stage_dir("base") / "stage.log")
            return out
        return resolve_checkpoint(path)

    def _write_corpus(self, path: Path) -> None:
        """The base model's pretraining text: every train-split dialogue with its chosen response (the
        held-out part stays unseen, so its perplexity stays a held-out number)."""
        from c2f_megatron.data import load_from_config

        data = load_from_config(self.cfg.hh)
        lines = [json.dumps({"text": p.chosen_text}) for p in data.train]
        _write_atomic(path, "\n".join(lines) + "\n")

    def _merge(self) -> Path:
        out = self.stage_dir("merge") / "sweep"
        args = ["merge", "--a", str(self.outputs["coarse"]), "--b", str(self.outputs["sft"])]
        args += ["--gamma", self.cfg.merge.gammas, "--out", str(out), "--force"]
        self.runner(args, self.cfg.merge.nproc, self.stage_dir("merge") / "stage.log")
        return out

    def eval_models(self) -> list[tuple[str, Callable[[], Path]]]:
        """(row name, checkpoint) in table order: SFT, each gamma, coarse."""
        from c2f_megatron.merge.gamma import gamma_name, parse_gammas

        models: list[tuple[str, Callable[[], Path]]] = [("sft", lambda: self.outputs["sft"])]
        for name in [gamma_name(g) for g in parse_gammas(self.cfg.merge.gammas)]:
            models.append((name, lambda n=name: self._gamma_dir(n)))
        models.append(("coarse", lambda: self.outputs["coarse"]))
        return models

    def _gamma_dir(self, name: str) -> Path:
        """``c2f merge`` writes ``OUT/gamma_0.70`` for a sweep, ``OUT`` itself for a single gamma."""
        sweep = self.outputs["merge"]
        return sweep / name if (sweep / name).is_dir() else sweep

    def stages(self) -> list[Stage]:
        o = self.outputs
        stages = [
            Stage("base", self._base),
            Stage(
                "sft", lambda: self._trained("sft", "train-sft", self.sft_job(o["base"]), self.cfg.sft.nproc)
            ),
            Stage("rm", lambda: self._trained("rm", "train-rm", self.rm_job(o["sft"]), self.cfg.rm.nproc)),
            Stage(
                "coarse",
                lambda: self._trained(
                    "coarse",
                    "coarse-actor",
                    self.coarse_job(o["sft"], o["rm"]),
                    self.cfg.coarse.nproc,
                    "actor",
                ),
            ),
            Stage("merge", self._merge),
        ]
        for name, ckpt in self.eval_models():
            stages.append(Stage(f"eval/{name}", lambda n=name, c=ckpt: self._eval(n, c())))
        return stages

    def _trained(
        self, name: str, command: str, job: dict[str, Any], nproc: int, role: str | None = None
    ) -> Path:
        self._run_job(name, command, job, nproc)
        return self._latest(name, role)

    def _eval(self, name: str, ckpt: Path) -> Path:
        baseline = None if name == "sft" else self.stage_dir("eval/sft")
        job = self.eval_job(name, ckpt, self.outputs["rm"], baseline)
        self._run_job(f"eval/{name}", "eval", job, self.cfg.eval.nproc)
        return self.stage_dir(f"eval/{name}") / "eval.json"

    # ------------------------------------------------------------------------------------------- run

    def run(self) -> Path:
        """Run (or skip) every stage, then write the report; returns the report directory."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.config_dump is not None:
            _write_atomic(self.run_dir / "pipeline.yaml", yaml.safe_dump(self.config_dump, sort_keys=False))
        for stage in self.stages():
            marker = self.stage_dir(stage.name) / MARKER
            if marker.is_file():
                record = json.loads(marker.read_text())
                self.outputs[stage.name] = Path(record["output"])
                self.skipped.append(stage.name)
                logger.info("stage %s: done earlier, skipped (%s)", stage.name, record["output"])
                continue
            logger.info("stage %s: running", stage.name)
            start = time.perf_counter()
            output = stage.run()
            record = {
                "stage": stage.name,
                "output": str(output),
                "seconds": round(time.perf_counter() - start, 1),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            _write_atomic(marker, json.dumps(record, indent=2) + "\n")
            self.outputs[stage.name] = output
            self.ran.append(stage.name)
            logger.info("stage %s: done in %.1f s -> %s", stage.name, record["seconds"], output)
        return self.write_report()

    def write_report(self) -> Path:
        """The Table-3-style table (rows: SFT, each gamma, coarse) and the plots, from the stage outputs."""
        from c2f_megatron.eval.plots import plot_metrics_vs_gamma, plot_ppo_curves, read_metrics_jsonl
        from c2f_megatron.eval.report import RunMetadata, write_report

        out = self.run_dir / "report"
        rows = []
        for name, _ in self.eval_models():
            doc = json.loads(Path(self.outputs[f"eval/{name}"]).read_text())
            row = dict(doc["rows"][0])
            row["gamma"] = _gamma_of(name)
            rows.append({"model": row.pop("model"), "gamma": row.pop("gamma"), **row})
        meta = RunMetadata(
            model=self.cfg.title,
            checkpoint=str(self.run_dir),
            seed=int(self.cfg.hh.seed),
            config=to_dict(self.cfg),
        )
        for row in rows:
            row.pop("checkpoint", None)
        write_report(out, "table", rows, meta)
        history = read_metrics_jsonl(self.stage_dir("coarse") / "metrics.jsonl")
        plot_ppo_curves(history, out / "ppo_reward_length.png")
        plot_metrics_vs_gamma(rows, out / "metrics_vs_gamma.png")
        return out


def _gamma_of(name: str) -> float | None:
    """gamma of a merged model's row (``gamma_0.70``); None for the SFT and coarse rows."""
    return float(name.split("_", 1)[1]) if name.startswith("gamma_") else None


# ------------------------------------------------------------------------------------------ command


def register(subparsers: Any) -> None:
    help_text = "the whole C2F recipe end to end, resumable stage by stage"
    parser = subparsers.add_parser("pipeline", help=help_text, description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="pipeline YAML (see examples/pipeline_*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="key.path=value overrides, e.g. coarse.job.ppo.iterations=4"
    )
    parser.set_defaults(func=lambda args: main(args.config, args.overrides))


def main(config_path: str, overrides: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(PipelineConfig, config_path, overrides)
        pipeline = Pipeline(cfg, config_dump=to_dict(cfg))
        pipeline.validate()
    except (ConfigError, ValueError) as exc:
        print(f"c2f pipeline: {exc}", file=sys.stderr)
        return 2
    try:
        report = pipeline.run()
    except StageFailed as exc:
        print(f"c2f pipeline: {exc}\nrerun the same command to resume at this stage", file=sys.stderr)
        return 1
    print(f"report: {report}")
    return 0
