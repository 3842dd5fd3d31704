"""The pipeline's stages: how each is run, how their outputs chain, and when one is already done.

    base (converted from a pretrained model, or train-lm) -> sft (or the base itself: the instruct model)
    -> rm -> coarse (PPO + CM) and each variant (e.g. Plus: ordinary PPO) -> merge (coarse sweep over gamma,
    variants at their gamma) -> eval (one stage per table row) -> report

Each stage runs as its own process (``c2f <command> run_dir/<stage>/job.yaml``, under torchrun when
``nproc > 1``), so torch.distributed state never leaks between stages and a crash is contained. A stage is
done when ``run_dir/<stage>/stage.json`` exists (or, with ``reuse``, the same marker in the reused run);
that marker is written atomically only after the stage's command exited 0, so rerunning the same command
after a crash skips finished stages and resumes at the one that failed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from c2f_megatron.checkpoint.resolve import PACKAGED_SMOLLM2
from c2f_megatron.config import ConfigError, deep_merge, from_dict, to_dict
from c2f_megatron.files import write_atomic
from c2f_megatron.pipeline.config import PipelineConfig, VariantSection

logger = logging.getLogger(__name__)

MARKER = "stage.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


# Lines of a stage's output the pipeline's console repeats: the jobs' compact progress lines.
_PROGRESS = re.compile(r"^(step|iter) +\d+/\d+ \|")


def subprocess_runner(args: list[str], nproc: int, log_path: Path) -> None:
    """Run one stage command with its output appended to ``log_path`` (progress lines also shown on the
    console, indented); raise ``StageFailed`` on failure."""
    cmd = c2f_command(args, nproc)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy(), text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if _PROGRESS.match(line):
                print(f"    {line.rstrip()}", flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise StageFailed(f"command `c2f {' '.join(args)}` exited {rc}; log {log_path}:\n" + "\n".join(tail))


# ------------------------------------------------------------------------------------------ helpers


def _set(mapping: dict[str, Any], dotted: str, value: Any) -> None:
    node = mapping
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def gamma_of(name: str) -> float | None:
    """gamma of a merged model's row (``gamma_0.70``, ``plus_gamma_0.70``); None for the other rows."""
    match = re.search(r"gamma_([0-9.]+)$", name)
    return float(match.group(1)) if match else None


def last_length_limit(metrics_path: Path) -> int:
    """The length limit a PPO run ended with (its last record's next-iteration limit)."""
    from c2f_megatron.training.summary import read_metrics_jsonl

    records = [r for r in read_metrics_jsonl(metrics_path) if "length_limit" in r]
    if not records:
        raise StageFailed(f"{metrics_path}: no length_limit records to take a fixed length from")
    return int(records[-1]["length_limit"])


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
        self.seconds: dict[str, float] = {}

    # ----------------------------------------------------------------------------------- job configs

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    @property
    def partner(self) -> str:
        """The merge partner's row name: the SFT model, or the base itself (an instruct model)."""
        return self.cfg.sft.label

    def tokenizer(self) -> str | None:
        """The configured tokenizer, else the base model's own (a converted model carries it), else None."""
        from c2f_megatron.checkpoint import TOKENIZER_FILES

        if self.cfg.tokenizer is not None or "base" not in self.outputs:
            return self.cfg.tokenizer
        own = self.outputs["base"] / "tokenizer"
        return str(own) if any((own / f).is_file() for f in TOKENIZER_FILES) else None

    def _job(self, section_job: dict[str, Any], name: str) -> dict[str, Any]:
        job = copy.deepcopy(section_job)
        _set(job, "checkpoint.dir", str(self.stage_dir(name) / "checkpoints"))
        _set(job, "logging.run_dir", str(self.stage_dir(name)))
        return job

    def _shared_data(self, job: dict[str, Any]) -> None:
        _set(job, "data.hh", to_dict(self.cfg.hh))
        _set(job, "data.tokenizer", self.tokenizer())

    def base_job(self) -> dict[str, Any]:
        job = self._job(self.cfg.base.job, "base")
        _set(job, "data.paths", [str(self.stage_dir("base") / "corpus.jsonl")])
        _set(job, "data.text_field", "text")
        _set(job, "data.tokenizer", self.cfg.tokenizer)
        return job

    def sft_job(self, base: Path) -> dict[str, Any]:
        job = self._job(self.cfg.sft.job, "sft")
        self._shared_data(job)
        _set(job, "checkpoint.init_from", str(base))
        return job

    def rm_job(self, partner: Path) -> dict[str, Any]:
        job = self._job(self.cfg.rm.job, "rm")
        self._shared_data(job)
        _set(job, "checkpoint.init_from", str(partner))  # backbone of the partner, fresh scalar head
        return job

    def ppo_job(self, name: str, partner: Path, rm: Path, variant: VariantSection | None = None):
        job = self._job(deep_merge(self.cfg.coarse.job, variant.job if variant else {}), name)
        self._shared_data(job)
        _set(job, "actor.init_from", str(partner))
        _set(job, "reward.kind", "model")
        _set(job, "reward.path", str(rm))
        if (
            variant is not None
            and variant.fixed_length_from is not None
            and variant.fixed_length_from in self.outputs
        ):
            length = last_length_limit(self.stage_dir_of(variant.fixed_length_from) / "metrics.jsonl")
            _set(job, "length", {"kind": "fixed", "fixed_length": length})
        return job

    def eval_job(self, name: str, ckpt: Path, rm: Path, baseline: Path | None) -> dict[str, Any]:
        job = copy.deepcopy(self.cfg.eval.job)
        job.update(
            checkpoint=str(ckpt),
            name=name,
            rm=str(rm),
            baseline=str(baseline) if baseline else None,
            tokenizer=self.tokenizer(),
            out_dir=str(self.stage_dir(f"eval/{name}")),
            report_name="eval",
        )
        _set(job, "responses.hh", to_dict(self.cfg.hh))
        return job

    def validate(self) -> None:
        """Load every stage's job config (with placeholder paths) so a typo fails before any training."""
        from c2f_megatron.eval.config import EvalConfig
        from c2f_megatron.merge.gamma import parse_gammas
        from c2f_megatron.rl.config import PPOJobConfig
        from c2f_megatron.training.tasks.lm import LMJobConfig
        from c2f_megatron.training.tasks.reward import RMJobConfig
        from c2f_megatron.training.tasks.sft import SFTJobConfig

        ph = self.run_dir / "placeholder"
        jobs = [
            ("rm.job", RMJobConfig, self.rm_job(ph)),
            ("coarse.job", PPOJobConfig, self.ppo_job("coarse", ph, ph)),
            ("eval.job", EvalConfig, self.eval_job("x", ph, ph, ph)),
        ]
        jobs += [
            (f"variants.{v.name}.job", PPOJobConfig, self.ppo_job(v.name, ph, ph, v))
            for v in self.cfg.variants
        ]
        if self.cfg.sft.enabled:
            jobs.insert(0, ("sft.job", SFTJobConfig, self.sft_job(ph)))
        if self.cfg.base.pretrained is None:
            jobs.insert(0, ("base.job", LMJobConfig, self.base_job()))
        for where, cls, job in jobs:
            from_dict(cls, job, where=f"pipeline config {where}")
        for field in ("gammas", "variant_gammas"):
            try:
                parse_gammas(getattr(self.cfg.merge, field))
            except ValueError as exc:
                raise ConfigError(f"pipeline config merge.{field}: {exc}") from exc
        rows = [name for name, _ in self.eval_models()]
        for where, names in [("pairs", n) for n in self.cfg.report.pairs] + [
            ("before_after", self.cfg.report.before_after)
        ]:
            for name in names:
                if name not in rows:
                    raise ConfigError(
                        f"pipeline config report.{where}: {name!r} is not a row ({', '.join(rows)})"
                    )

    # ----------------------------------------------------------------------------------------- stages

    def _run_job(self, name: str, command: str, job: dict[str, Any], nproc: int) -> None:
        job_path = self.stage_dir(name) / "job.yaml"
        write_atomic(job_path, yaml.safe_dump(job, sort_keys=False))
        self.runner([command, str(job_path)], nproc, self.stage_dir(name) / "stage.log")

    def stage_dir_of(self, name: str) -> Path:
        """Where stage ``name``'s files are: this run's directory, or the reused run's when it came from
        there."""
        reused = Path(self.cfg.reuse) / name if self.cfg.reuse else None
        if (
            reused is not None
            and (reused / MARKER).is_file()
            and not (self.stage_dir(name) / MARKER).is_file()
        ):
            return reused
        return self.stage_dir(name)

    def _latest(self, name: str, role: str | None = None) -> Path:
        from c2f_megatron.checkpoint.steps import latest_checkpoint

        root = self.stage_dir(name) / "checkpoints"
        latest = latest_checkpoint(root)
        if latest is None:
            raise StageFailed(f"stage {name}: finished but {root} holds no complete step checkpoint")
        return latest / role if role else latest

    def _base(self) -> Path:
        pretrained = self.cfg.base.pretrained
        if pretrained is not None:
            return self._pretrained(pretrained)
        self._write_corpus(self.stage_dir("base") / "corpus.jsonl")
        self._run_job("base", "train-lm", self.base_job(), self.cfg.base.nproc)
        return self._latest("base")

    def _pretrained(self, spec: str) -> Path:
        """A c2f checkpoint as it is; anything else converted once into ``base/``: a GGUF file to HF, a
        hub id downloaded, then HF to Megatron."""
        from c2f_megatron.checkpoint.hf_dir import is_hf_directory
        from c2f_megatron.checkpoint.resolve import resolve_checkpoint

        log = self.stage_dir("base") / "stage.log"
        path = Path(spec).expanduser()
        if spec == PACKAGED_SMOLLM2 or spec.endswith(".gguf"):
            from c2f_megatron.checkpoint.gguf import smollm2_gguf_path

            gguf = smollm2_gguf_path() if spec == PACKAGED_SMOLLM2 else path
            path = self.stage_dir("base") / "hf"
            self.runner(["convert", "gguf-to-hf", "--gguf", str(gguf), "--out", str(path), "--force"], 1, log)
        elif _HUB_ID.match(spec) and not path.exists():
            path = self._download(spec)
        if path.is_dir() and is_hf_directory(path):
            out = self.stage_dir("base") / "converted"
            args = ["convert", "hf-to-megatron", "--hf-dir", str(path), "--out", str(out), "--force"]
            if self.cfg.base.dtype is not None:
                args += ["--dtype", self.cfg.base.dtype]
            self.runner(args, 1, log)
            return out
        return resolve_checkpoint(path)

    def _download(self, repo: str) -> Path:
        """A hub model's safetensors, config and tokenizer files (``huggingface_hub``; needs the network)."""
        from huggingface_hub import snapshot_download

        out = self.stage_dir("base") / "hub"
        patterns = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]
        return Path(snapshot_download(repo, local_dir=str(out), allow_patterns=patterns))

    def _write_corpus(self, path: Path) -> None:
        """The base model's pretraining text: every train-split dialogue with its chosen response (the
        held-out part stays unseen, so its perplexity stays a held-out number)."""
        from c2f_megatron.data import load_from_config

        data = load_from_config(self.cfg.hh)
        write_atomic(path, "\n".join(json.dumps({"text": p.chosen_text}) for p in data.train) + "\n")

    def _merge(self, name: str, a: Path, gammas: str) -> Path:
        out = self.stage_dir(name) / "sweep"
        args = ["merge", "--a", str(a), "--b", str(self.outputs[self.partner])]
        args += ["--gamma", gammas, "--out", str(out), "--force"]
        self.runner(args, self.cfg.merge.nproc, self.stage_dir(name) / "stage.log")
        return out

    def eval_models(self) -> list[tuple[str, Callable[[], Path]]]:
        """(row name, checkpoint) in table order: partner, each gamma, coarse, then each variant and its
        merged rows."""
        from c2f_megatron.merge.gamma import gamma_name, parse_gammas

        o = self.outputs
        models: list[tuple[str, Callable[[], Path]]] = [(self.partner, lambda: o[self.partner])]
        for name in [gamma_name(g) for g in parse_gammas(self.cfg.merge.gammas)]:
            models.append((name, lambda n=name: self._gamma_dir("merge", n)))
        models.append(("coarse", lambda: o["coarse"]))
        for v in self.cfg.variants:
            models.append((v.name, lambda n=v.name: o[n]))
            if v.merge:
                for name in [gamma_name(g) for g in parse_gammas(self.cfg.merge.variant_gammas)]:
                    stage = f"merge_{v.name}"
                    models.append((f"{v.name}_{name}", lambda s=stage, n=name: self._gamma_dir(s, n)))
        return models

    def _gamma_dir(self, stage: str, name: str) -> Path:
        """``c2f merge`` writes ``OUT/gamma_0.70`` for a sweep, ``OUT`` itself for a single gamma."""
        sweep = self.outputs[stage]
        return sweep / name if (sweep / name).is_dir() else sweep

    def stages(self) -> list[Stage]:
        o, cfg = self.outputs, self.cfg
        stages = [Stage("base", self._base)]
        if cfg.sft.enabled:
            run_sft = lambda: self._trained("sft", "train-sft", self.sft_job(o["base"]), cfg.sft.nproc)  # noqa: E731
            stages.append(Stage("sft", run_sft))
        stages += [
            Stage("rm", lambda: self._trained("rm", "train-rm", self.rm_job(o[self.partner]), cfg.rm.nproc)),
            Stage("coarse", lambda: self._ppo("coarse", cfg.coarse.nproc, None)),
        ]
        stages += [Stage(v.name, lambda v=v: self._ppo(v.name, v.nproc, v)) for v in cfg.variants]
        stages.append(Stage("merge", lambda: self._merge("merge", o["coarse"], cfg.merge.gammas)))
        for v in cfg.variants:
            if v.merge:
                run = lambda n=v.name: self._merge(f"merge_{n}", o[n], cfg.merge.variant_gammas)  # noqa: E731
                stages.append(Stage(f"merge_{v.name}", run))
        for name, ckpt in self.eval_models():
            stages.append(Stage(f"eval/{name}", lambda n=name, c=ckpt: self._eval(n, c())))
        return stages

    def _ppo(self, name: str, nproc: int, variant: VariantSection | None) -> Path:
        job = self.ppo_job(name, self.outputs[self.partner], self.outputs["rm"], variant)
        return self._trained(name, "coarse-actor", job, nproc, "actor")

    def _trained(
        self, name: str, command: str, job: dict[str, Any], nproc: int, role: str | None = None
    ) -> Path:
        self._run_job(name, command, job, nproc)
        return self._latest(name, role)

    def _eval(self, name: str, ckpt: Path) -> Path:
        baseline = None if name == self.partner else self.stage_dir_of(f"eval/{self.partner}")
        job = self.eval_job(name, ckpt, self.outputs["rm"], baseline)
        self._run_job(f"eval/{name}", "eval", job, self.cfg.eval.nproc)
        return self.stage_dir(f"eval/{name}") / "eval.json"

    # ------------------------------------------------------------------------------------------- run

    def run(self) -> Path:
        """Run (or skip) every stage, then write the report; returns the report directory."""
        from c2f_megatron.pipeline.report import write_pipeline_report

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.config_dump is not None:
            write_atomic(self.run_dir / "pipeline.yaml", yaml.safe_dump(self.config_dump, sort_keys=False))
        for stage in self.stages():
            if not self.cfg.sft.enabled and "base" in self.outputs:
                self.outputs.setdefault(self.partner, self.outputs["base"])
            marker = self.stage_dir_of(stage.name) / MARKER
            if marker.is_file():
                record = json.loads(marker.read_text())
                self.outputs[stage.name] = Path(record["output"])
                self.seconds[stage.name] = float(record.get("seconds", 0.0))
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
            write_atomic(self.stage_dir(stage.name) / MARKER, json.dumps(record, indent=2) + "\n")
            self.outputs[stage.name] = output
            self.seconds[stage.name] = record["seconds"]
            self.ran.append(stage.name)
            logger.info("stage %s: done in %.1f s -> %s", stage.name, record["seconds"], output)
        return write_pipeline_report(self)
