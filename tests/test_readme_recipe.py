"""README's "The recipe, step by step" runs as written, in order, with a tiny model in place of Mistral-7B.

The commands are read out of README.md. Three things change, and nothing else: the hub download writes a
random tiny Mistral (vocabulary of the real Mistral tokenizer) where the download would put 7B; the
8-GPU launcher becomes one process; and each training or eval command gets overrides that make it small
(one process: TP = PP = 1, a few steps, short sequences, HH-RLHF from ../shared/data). Every path stays
the README's, so a step that writes somewhere the next step does not read fails here.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import REPO_ROOT, worker_env

SECTION = "## The recipe, step by step"
DOWNLOAD = re.compile(r"^hf download mistralai/Mistral-7B-v0\.1 .*--local-dir (\S+)$")
LAUNCHER = "torchrun --nproc_per_node=8 -m c2f_megatron.cli "


def recipe_commands(readme: Path) -> list[str]:
    """The shell commands of the section's first bash block, continuation lines joined, comments dropped."""
    text = readme.read_text()
    section = text[text.index(SECTION) :]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def one_process(parallel: str = "parallel") -> list[str]:
    return [f"{parallel}.tensor_model_parallel_size=1", f"{parallel}.pipeline_model_parallel_size=1"]


def hh(prefix: str, hh_file: Path) -> list[str]:
    return [f"{prefix}.source={hh_file}", f"{prefix}.split=null", f"{prefix}.data_dir=null"]


def small_overrides(command: str, hh_file: Path) -> list[str]:
    """What makes one README command small; keyed by its subcommand (and config)."""
    train = [
        "train.train_steps=2",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        "train.seq_length=48",
        "train.eval_interval=0",
        "train.eval_batches=1",
        "train.save_interval=2",
        "optim.warmup_steps=0",
        *one_process(),
        *hh("data.hh", hh_file),
    ]
    if " train-sft " in command or " train-rm " in command:
        return train
    if " coarse-actor " in command:
        return [
            *one_process(),
            *one_process("reference.parallel"),
            *one_process("reward.parallel"),
            "ppo.iterations=2",
            "ppo.rollout_batch_size=2",
            "ppo.mini_batch_size=2",
            "ppo.micro_batch_size=1",
            "ppo.critic_warmup_iterations=0",
            "length.cm.initial_length=6",
            "length.cm.max_length=12",
            "length.cm.step=6",
            "length.cm.window=3",
            "length.cm.cooldown=0",
            "data.max_prompt_length=32",
            "checkpoint.save_interval=2",
            *hh("data.hh", hh_file),
        ]
    if command.startswith("c2f eval "):
        return [
            "responses.num_prompts=2",
            "responses.num_references=2",
            "responses.max_new_tokens=6",
            "responses.max_prompt_length=32",
            "responses.max_reference_length=48",
            *hh("responses.hh", hh_file),
        ]
    return []


def write_tiny_mistral(out: Path) -> None:
    """What the download would leave: safetensors, config and tokenizer.model, at a tiny size."""
    from transformers import MistralConfig, MistralForCausalLM

    from c2f_megatron.data.tokenizer import mistral_v01_model_path

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=None,
    )
    cfg.architectures = ["MistralForCausalLM"]
    MistralForCausalLM(cfg).save_pretrained(out)
    shutil.copy(mistral_v01_model_path(), out / "tokenizer.model")


def test_readme_lists_the_recipe() -> None:
    commands = recipe_commands(REPO_ROOT / "README.md")
    assert DOWNLOAD.match(commands[0]), commands[0]
    assert [c.split()[4] for c in commands if c.startswith(LAUNCHER)] == [
        "train-sft",
        "train-rm",
        "coarse-actor",
    ]
    assert any(c.startswith("c2f merge ") for c in commands) and any(
        c.startswith("c2f eval ") for c in commands
    )


def test_readme_recipe_runs_in_order(tmp_path: Path, shared_data: Path) -> None:
    hh_file = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    env = worker_env(threads=2)
    for command in recipe_commands(REPO_ROOT / "README.md"):
        download = DOWNLOAD.match(command)
        if download:
            write_tiny_mistral(tmp_path / download.group(1))
            continue
        args = shlex.split(command)
        if command.startswith(LAUNCHER):
            args = args[4:]
        elif args[0] == "c2f":
            args = args[1:]
        else:
            pytest.fail(f"README recipe: no rule to run {command!r}")
        args += small_overrides(command, hh_file)
        proc = subprocess.run(
            [sys.executable, "-m", "c2f_megatron.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (
            f"README recipe: `{command}` failed\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    assert (tmp_path / "runs/coarse_7b/summary.md").is_file()
    assert (tmp_path / "ckpt/fine/gamma_0.70/c2f_checkpoint.json").is_file()
    assert (tmp_path / "runs/eval_7b/fine_0.70/eval.json").is_file()
    assert (tmp_path / "hf/mistral-7b-c2f-0.70/config.json").is_file()
