"""Typed YAML configuration with command-line overrides; errors name the source and the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from c2f_megatron.config import ConfigError, dump_config, load_config, parse_overrides
from c2f_megatron.models.config import ModelConfig


@dataclass
class Optim:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Job:
    name: str = "run"
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    init_from: str | None = None
    optim: Optim = field(default_factory=Optim)
    model: ModelConfig = field(default_factory=ModelConfig)


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 3.0e-4\nmodel:\n  num_layers: 4\n")
    job = load_config(Job, path, ["optim.lr=1e-3", "mode=b", "init_from=/ckpt", "model.sliding_window=8"])
    assert job.steps == 20 and job.optim.lr == 1e-3 and job.mode == "b" and job.init_from == "/ckpt"
    assert job.model.num_layers == 4 and job.model.sliding_window == 8 and job.optim.betas == [0.9, 0.95]
    dump_config(job, tmp_path / "out.yaml")
    assert load_config(Job, tmp_path / "out.yaml") == job


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("stepz: 3\n", [], r"job.yaml: unknown field\(s\) stepz"),
        ("steps: many\n", [], r"job.yaml.steps: expected an integer"),
        ("optim:\n  lr: fast\n", [], r"job.yaml.optim.lr: expected a number"),
        ("mode: c\n", [], r"job.yaml.mode: 'c' is not one of"),
        ("model:\n  num_attention_heads: 3\n", [], r"job.yaml.model"),
        ("- 1\n", [], "top level must be a mapping"),
        ("", ["optim.lr"], "expected key.path=value"),
        ("", ["optim.momentum=1"], r"overrides.optim: unknown field\(s\) momentum"),
    ],
)
def test_errors_name_file_and_field(tmp_path, text, overrides, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(Job, path, overrides)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Job, "/nonexistent/job.yaml")


def test_override_parsing():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e=null"]) == {
        "a": {"b": 1, "c": "x"},
        "d": [1, 2],
        "e": None,
    }


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parents[1].joinpath("examples").glob("*.yaml"))
)
def test_every_example_config_loads(path: Path) -> None:
    """The shipped examples parse into their job's typed config (a renamed field breaks them loudly)."""
    import importlib

    from c2f_megatron.pipeline import PipelineConfig
    from c2f_megatron.rl.config import PPOJobConfig
    from c2f_megatron.training.cli import JOBS

    kind = path.stem.split("_")[0]
    if kind == "coarse":
        cls = PPOJobConfig
    elif kind == "pipeline":
        cls = PipelineConfig
    else:
        module, name, _ = JOBS[{"lm": "train-lm", "sft": "train-sft", "rm": "train-rm"}[kind]]
        cls = getattr(importlib.import_module(module), name)
    load_config(cls, path)


def test_field_docs_and_defaults_reach_the_help() -> None:
    """Each field's doc is its source comment (or the string under it) and ``--help`` lists every field
    with the default the job really gets (a section's own factory defaults, not its class defaults)."""
    import subprocess
    import sys
    from dataclasses import dataclass

    from c2f_megatron.config import field_docs, fields_help
    from c2f_megatron.rl.config import PPOJobConfig

    @dataclass
    class Section:
        a: int = 1  # the first field
        b: str = "x"
        """the second field, documented below it"""

    assert field_docs(Section) == {"a": "the first field", "b": "the second field, documented below it"}
    text = fields_help(PPOJobConfig)
    assert "  actor.optim.lr = 5e-06" in text and "  critic.optim.lr = 5e-07" in text
    assert "  reward.kind = 'model'" in text  # the section default and the job's agree
    assert "  ppo.max_consecutive_nonfinite = 3  # iterations in a row" in text
    out = subprocess.run(
        [sys.executable, "-m", "c2f_megatron.cli", "coarse-actor", "--help"], capture_output=True, text=True
    ).stdout
    assert "config fields" in out and "  length.cm.max_length = " in out


def test_an_override_that_is_not_yaml_is_one_config_error():
    with pytest.raises(ConfigError, match=r"^override 'a.b=\{x:': the value is not valid YAML \("):
        parse_overrides(["a.b={x:"])
