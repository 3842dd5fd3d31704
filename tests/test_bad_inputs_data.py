"""Broken data files and nonsensical config values: one line naming the file (and line) or the field, exit
code 2, no traceback, nothing left behind.

The commands run as subprocesses (``python -m c2f_megatron.cli ...``) on the shipped CPU examples with
overrides pointing at files under ``tmp_path``; every case fails before a model is built. The readers and
config sections are also checked in process, for the cases that would cost a subprocess each.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

import pytest

from c2f_megatron.config import ConfigError, load_config
from c2f_megatron.data.hh_rlhf import HHDataConfig, load_from_config, load_hh_rlhf, train_eval_split
from c2f_megatron.files import DataFileError, read_jsonl
from tests.launch import REPO_ROOT, refusal, run_c2f

P = "\n\nHuman: How do I bake bread?\n\nAssistant:"
GOOD = json.dumps({"chosen": f"{P} Knead it.", "rejected": f"{P} Buy it."})


def _lines(n: int) -> str:
    return "".join(
        json.dumps({"chosen": f"{P} Knead {i}.", "rejected": f"{P} Buy {i}."}) + "\n" for i in range(n)
    )


# --- the broken files ------------------------------------------------------------------------------------


def _empty(d: Path) -> Path:
    (d / "empty.jsonl").write_bytes(b"")
    return d / "empty.jsonl"


def _blank(d: Path) -> Path:
    (d / "blank.jsonl").write_text("\n  \n\n")
    return d / "blank.jsonl"


def _all_invalid(d: Path) -> Path:
    (d / "texts.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(4)))
    return d / "texts.jsonl"


def _bad_json(d: Path) -> Path:
    (d / "bad.jsonl").write_text('{"chosen": "unterminated\n')
    return d / "bad.jsonl"


def _latin1(d: Path) -> Path:
    record = json.dumps({"chosen": f"{P} Caf\u00e9.", "rejected": f"{P} No."}, ensure_ascii=False)
    (d / "latin1.jsonl").write_bytes((record + "\n").encode("latin-1") * 3)
    return d / "latin1.jsonl"


def _truncated_gz(d: Path) -> Path:
    (d / "cut.jsonl.gz").write_bytes(gzip.compress(_lines(400).encode())[:-40])
    return d / "cut.jsonl.gz"


def _not_gzip(d: Path) -> Path:
    (d / "plain.jsonl.gz").write_text(_lines(3))
    return d / "plain.jsonl.gz"


def _empty_gzip(d: Path) -> Path:
    (d / "nothing.jsonl.gz").write_bytes(gzip.compress(b""))
    return d / "nothing.jsonl.gz"


def _all_held_out(d: Path) -> Path:
    """Two pairs that both fall in the held-out part at eval_fraction 0.9, seed 0."""
    pairs = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(200)]
    text = [json.dumps({"chosen": f"{p} Yes.", "rejected": f"{p} No."}) for p in pairs]
    (d / "probe.jsonl").write_text("\n".join(text) + "\n")
    loaded = load_hh_rlhf(d / "probe.jsonl").pairs
    held = [t for t, pair in zip(text, loaded) if not train_eval_split([pair], 0.9, 0)[0]][:2]
    (d / "probe.jsonl").unlink()
    (d / "held_out.jsonl").write_text("\n".join(held) + "\n")
    return d / "held_out.jsonl"


# --- the commands ----------------------------------------------------------------------------------------


def _refused(args: list[str], command: str, *expected: str) -> str:
    line = refusal(run_c2f(*args, timeout=180), command)
    for part in expected:
        assert part in line, line
    return line


def _files_under(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


# Each command pays ~10 s of megatron imports before it reads its data, so the subprocess cases are a few
# (one per message family and command); test_hh_reader_refuses checks every file case's message in process.
HH_CLI_CASES = [
    # (id, file maker, command, extra overrides, what the line names)
    ("empty", _empty, "train-rm", [], ["empty.jsonl: empty file"]),
    ("truncated_gz", _truncated_gz, "train-sft", [], ["cut.jsonl.gz: truncated or corrupt gzip after line"]),
    (
        "train_split_empty",
        _all_held_out,
        "train-sft",
        ["data.hh.eval_fraction=0.9"],
        ["held_out.jsonl: the training split is empty", "eval_fraction 0.9"],
    ),
]


@pytest.mark.parametrize(
    ("maker", "command", "extra", "expected"),
    [case[1:] for case in HH_CLI_CASES],
    ids=[case[0] for case in HH_CLI_CASES],
)
def test_trainer_refuses_bad_hh_file(tmp_path: Path, maker, command, extra, expected) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = maker(data)
    before = _files_under(tmp_path)
    example = {"train-rm": "rm_cpu.yaml", "train-sft": "sft_cpu.yaml"}[command]
    args = [
        command,
        f"examples/{example}",
        f"data.hh.source={path}",
        f"logging.run_dir={tmp_path / 'run'}",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        *extra,
    ]
    _refused(args, command, str(data), *expected)
    assert _files_under(tmp_path) == before  # no run dir, no checkpoint dir, no skipped_records.txt


def test_coarse_actor_refuses_prompts_that_are_all_too_long(tmp_path: Path, shared_data: Path) -> None:
    source = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    _refused(
        [
            "coarse-actor",
            "examples/coarse_actor_cpu.yaml",
            f"data.hh.source={source}",
            "data.hh.max_pairs=20",
            "data.max_prompt_length=4",
            "data.overlong=drop",
            "reward.kind=token_frequency",
            f"logging.run_dir={tmp_path / 'run'}",
            f"checkpoint.dir={tmp_path / 'ckpt'}",
        ],
        "coarse-actor",
        f"{source}: all 16 prompt(s) are longer than",
    )
    # neither the resolved config nor the list of skipped records (9 malformed records in this file) is
    # written for a run that never starts
    assert _files_under(tmp_path) == set()


CONFIG_CLI_CASES = [
    # (id, args, command, what the line names)
    (
        "train_steps_0",
        ["train-rm", "examples/rm_cpu.yaml", "train.train_steps=0"],
        "train-rm",
        ["examples/rm_cpu.yaml + overrides.train: train_steps must be >= 1, got 0"],
    ),
    (
        "top_p_0",
        ["coarse-actor", "examples/coarse_actor_cpu.yaml", "generation.top_p=0"],
        "coarse-actor",
        ["overrides.generation: generation.top_p must be in (0, 1], got 0.0"],
    ),
    (
        "unknown_benchmark",
        ["eval", "--checkpoint", "/nonexistent", "benchmarks.names=[hellaswag]"],
        "eval",
        ["overrides.benchmarks: benchmarks.names: unknown benchmark 'hellaswag'"],
    ),
    (
        "pipeline_stage_gamma",
        ["pipeline", "examples/pipeline_nano.yaml", "coarse.job.ppo.gamma=2"],
        "pipeline",
        ["pipeline config coarse.job.ppo: ppo.gamma and ppo.lam must be in [0, 1]"],
    ),
]


@pytest.mark.parametrize(
    ("args", "command", "expected"),
    [case[1:] for case in CONFIG_CLI_CASES],
    ids=[case[0] for case in CONFIG_CLI_CASES],
)
def test_command_refuses_nonsensical_config(tmp_path: Path, args, command, expected) -> None:
    outputs = {
        "train-rm": [f"logging.run_dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ckpt'}"],
        "coarse-actor": [f"logging.run_dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ckpt'}"],
        "eval": [f"out_dir={tmp_path / 'eval'}"],
        "pipeline": [f"run_dir={tmp_path / 'pipeline'}"],
    }[command]
    _refused([*args, *outputs], command, *expected)
    assert _files_under(tmp_path) == set()


# --- the HH-RLHF reader in process: every case names the file (and line) in one line -------------------------


@pytest.mark.parametrize(
    ("maker", "message"),
    [
        (_empty, r"empty\.jsonl: empty file$"),
        (_blank, r"blank\.jsonl: empty file \(only blank lines\)$"),
        (
            _all_invalid,
            r"texts\.jsonl: no valid preference pair: all 4 record\(s\) skipped \(missing_field 4\); "
            r"first at line 1: missing_field \(no 'chosen' field\)$",
        ),
        (_bad_json, r"bad\.jsonl: no valid preference pair: .*\(bad_json 1\); first at line 1: bad_json"),
        (_latin1, r"latin1\.jsonl:1: not valid UTF-8 \(invalid continuation byte at byte \d+\); no line"),
        (
            _truncated_gz,
            r"cut\.jsonl\.gz: truncated or corrupt gzip after line \d+ \(Compressed file ended before the "
            r"end-of-stream marker was reached\)$",
        ),
        (_not_gzip, r"plain\.jsonl\.gz: not gzip-compressed \(the name ends in \.gz\)$"),
        (_empty_gzip, r"nothing\.jsonl\.gz: empty file$"),
    ],
    ids=["empty", "blank", "all_invalid", "bad_json", "not_utf8", "truncated_gz", "not_gzip", "empty_gzip"],
)
def test_hh_reader_refuses(tmp_path: Path, maker, message: str) -> None:
    path = maker(tmp_path)
    skipped = tmp_path / "run" / "skipped_records.txt"
    with pytest.raises(DataFileError, match=message) as err:
        load_from_config(HHDataConfig(source=str(path), split=None), skipped)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert str(err.value).startswith(str(path))
    assert not skipped.parent.exists()


def test_hh_reader_corrupt_gzip_stream(tmp_path: Path) -> None:
    blob = bytearray(gzip.compress(_lines(400).encode()))
    blob[len(blob) // 2 : len(blob) // 2 + 8] = b"\xff" * 8
    (tmp_path / "corrupt.jsonl.gz").write_bytes(bytes(blob))
    with pytest.raises(DataFileError, match=r"corrupt\.jsonl\.gz: truncated or corrupt gzip after line \d+"):
        load_hh_rlhf(tmp_path / "corrupt.jsonl.gz")


def test_hh_reader_unreadable_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: file not found$"):
        load_hh_rlhf(tmp_path / "missing.jsonl")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("not data")
    with pytest.raises(
        FileNotFoundError, match=r"docs: no HH-RLHF files \(\*\.jsonl / \*\.jsonl\.gz\) under it"
    ):
        load_hh_rlhf(tmp_path / "docs")
    locked = tmp_path / "locked.jsonl"
    locked.write_text(GOOD + "\n")

    def refuse(self: Path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)  # root reads a chmod 000 file anyway
    with pytest.raises(DataFileError, match=r"locked\.jsonl: cannot read \(Permission denied\)$"):
        load_hh_rlhf(locked)


def test_one_bad_line_among_good_ones_is_skipped_and_listed(tmp_path: Path) -> None:
    """A few malformed records are the dataset's business (listed in skipped_records.txt), not an error."""
    path = tmp_path / "mixed.jsonl"
    path.write_text(_lines(30) + '{"chosen": "cut\n')
    skipped = tmp_path / "run" / "skipped_records.txt"
    data = load_from_config(HHDataConfig(source=str(path), split=None, eval_fraction=0.0), skipped)
    assert len(data.train) == 30 and data.skipped_log == skipped
    assert f"{path}:31: bad_json" in skipped.read_text()


def test_hh_hub_source_that_cannot_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    def offline(name: str, data_dir: str | None = None, split: str | None = None):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    def empty(name: str, data_dir: str | None = None, split: str | None = None):
        return []

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(
        DataFileError, match=r"^hub:Anthropic/hh-rlhf: cannot load from the hub \(ConnectionError: "
    ):
        load_hh_rlhf("Anthropic/hh-rlhf", split="train")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=empty))
    with pytest.raises(DataFileError, match=r"^hub:Anthropic/hh-rlhf\[train\]: empty split$"):
        load_hh_rlhf("Anthropic/hh-rlhf", split="train")


def test_hh_source_must_not_be_empty() -> None:
    with pytest.raises(ConfigError, match=r"^defaults \+ overrides\.data\.hh: source must name"):
        from c2f_megatron.training.tasks.reward import RMJobConfig

        load_config(RMJobConfig, None, ["data.hh.source="])


# --- benchmark and MT-Bench files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"q\.jsonl: empty file \(no records\)$"),
        (b"\n\n", r"q\.jsonl: empty file \(no records\)$"),
        (b'{"a": 1}\n{"a": \n', r"q\.jsonl:2: invalid JSON"),
        (
            b'{"a": 1}\n{"a": "\xe9"}\n',
            r"q\.jsonl:2: not valid UTF-8 \(invalid continuation byte at byte 7\)$",
        ),
        (b'{"a": 1}\n[1, 2]\n', r"q\.jsonl: record 2: expected a JSON object, got list$"),
    ],
    ids=["empty", "blank", "bad_json", "not_utf8", "not_object"],
)
def test_benchmark_jsonl_reader(tmp_path: Path, content: bytes, message: str) -> None:
    from c2f_megatron.eval.benchmarks import BenchmarkDataError, read_jsonl
    from c2f_megatron.eval.mt_bench import MTBenchDataError, load_questions

    (tmp_path / "q.jsonl").write_bytes(content)
    with pytest.raises(BenchmarkDataError, match=message):
        read_jsonl(tmp_path / "q.jsonl")
    with pytest.raises(MTBenchDataError, match=message):
        load_questions(tmp_path / "q.jsonl")


def test_benchmark_directory_and_csv_and_json_files(tmp_path: Path) -> None:
    from c2f_megatron.eval.benchmarks import BenchmarkDataError, bbh_items, mmlu_items

    with pytest.raises(BenchmarkDataError, match=r"q\.jsonl: is a directory, not a file$"):
        (tmp_path / "q.jsonl").mkdir()
        from c2f_megatron.eval.benchmarks import read_jsonl

        read_jsonl(tmp_path / "q.jsonl")
    for sub in ("test", "dev"):
        (tmp_path / "mmlu" / sub).mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").write_bytes(b"q,a,b,c,d,A\nq\xe9,a,b,c,d,B\n")
    (tmp_path / "mmlu" / "dev" / "anatomy_dev.csv").write_bytes(b"")
    with pytest.raises(BenchmarkDataError, match=r"anatomy_test\.csv:2: not valid UTF-8"):
        mmlu_items(tmp_path, "local", ["anatomy"], None, 0)
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,A\n")
    with pytest.raises(BenchmarkDataError, match=r"anatomy_dev\.csv: empty file$"):
        mmlu_items(tmp_path, "local", ["anatomy"], None, 0)
    (tmp_path / "bbh" / "cot-prompts").mkdir(parents=True)
    (tmp_path / "bbh" / "cot-prompts" / "navigate.txt").write_text("canary\nQ: ...\n")
    (tmp_path / "bbh" / "navigate.json").write_text('{"examples": [\n{"input": "x",}\n]}')
    with pytest.raises(BenchmarkDataError, match=r"navigate\.json:2: invalid JSON \(Expecting property name"):
        bbh_items(tmp_path, "local", ["navigate"], None, 0)
    (tmp_path / "bbh" / "navigate.json").write_text('{"examples": []}')
    with pytest.raises(
        BenchmarkDataError, match=r"navigate\.json: field 'examples' must be a non-empty list$"
    ):
        bbh_items(tmp_path, "local", ["navigate"], None, 0)


def test_read_jsonl_reads_gzip_and_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n\n{"a": 2}\n'))
    assert read_jsonl(tmp_path / "rows.jsonl.gz") == [{"a": 1}, {"a": 2}]
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n' * 300)[:-20])
    with pytest.raises(DataFileError, match=r"rows\.jsonl\.gz: truncated or corrupt gzip after line \d+"):
        read_jsonl(tmp_path / "rows.jsonl.gz")


# --- config values that make no sense, refused at load naming the field ---------------------------------------


def _job(kind: str):
    if kind == "ppo":
        from c2f_megatron.rl.config import PPOJobConfig

        return PPOJobConfig
    if kind == "eval":
        from c2f_megatron.eval.config import EvalConfig

        return EvalConfig
    if kind == "pipeline":
        from c2f_megatron.pipeline.config import PipelineConfig

        return PipelineConfig
    from c2f_megatron.training.tasks.reward import RMJobConfig

    return RMJobConfig


CONFIG_CASES = [
    # (job, overrides separated by ";", message after "x.yaml + overrides")
    ("rm", "train.train_steps=0", r"\.train: train_steps must be >= 1, got 0"),
    ("rm", "train.log_interval=0", r"\.train: log_interval must be >= 1, got 0"),
    ("rm", "train.keep_last=0", r"\.train: keep_last must be >= 1, got 0"),
    ("rm", "train.save_interval=-1", r"\.train: save_interval must be >= 0, got -1"),
    ("rm", "train.exit_after_steps=0", r"\.train: exit_after_steps must be >= 1 or null, got 0"),
    (
        "rm",
        "train.global_batch_size=12",
        r"\.train: global_batch_size 12 is not a multiple of micro_batch_size 8",
    ),
    ("rm", "optim.lr=-1", r"\.optim: need 0 <= min_lr <= lr"),
    ("rm", "optim.adam_beta2=1.0", r"\.optim: adam_beta2 must be in \[0, 1\), got 1.0"),
    ("rm", "optim.adam_eps=0", r"\.optim: adam_eps must be > 0"),
    ("rm", "optim.clip_grad=-1", r"\.optim: clip_grad must be >= 0"),
    ("rm", "optim.decay_steps=0", r"\.optim: decay_steps must be >= 1 or null, got 0"),
    ("rm", "model.overrides.num_layers=0", r"\.model: invalid model config: num_layers must be >= 1, got 0"),
    (
        "rm",
        "model.overrides.num_query_groups=0",
        r"\.model: invalid model config: num_query_groups must be >= 1",
    ),
    ("rm", "model.overrides.hidden_dropout=1.5", r"\.model: invalid model config: hidden_dropout must be in"),
    ("rm", "model.overrides.num_layerz=2", r"\.model: model\.overrides: unknown field\(s\) \['num_layerz'\]"),
    ("rm", "model.preset=mistral-huge", r"\.model: unknown model preset 'mistral-huge'"),
    ("rm", "data.hh.eval_fraction=1", r"\.data\.hh: eval_fraction must be in \[0, 1\), got 1.0"),
    ("ppo", "ppo.rollout_batch_size=0", r"\.ppo: ppo\.rollout_batch_size must be >= 1, got 0"),
    ("ppo", "ppo.epochs=0", r"\.ppo: ppo\.epochs must be >= 1, got 0"),
    ("ppo", "ppo.clip_eps=0", r"\.ppo: ppo\.clip_eps must be in \(0, 1\)"),
    ("ppo", "ppo.value_clip=0", r"\.ppo: ppo\.value_clip must be > 0 or null, got 0.0"),
    ("ppo", "ppo.gamma=1.5", r"\.ppo: ppo\.gamma and ppo\.lam must be in \[0, 1\]"),
    ("ppo", "ppo.lam=-0.1", r"\.ppo: ppo\.gamma and ppo\.lam must be in \[0, 1\]"),
    ("ppo", "ppo.max_consecutive_nonfinite=0", r"\.ppo: ppo\.max_consecutive_nonfinite must be >= 1"),
    ("ppo", "ppo.critic_warmup_iterations=-1", r"\.ppo: ppo\.critic_warmup_iterations must be >= 0"),
    ("ppo", "kl.coef=-0.1", r"\.kl: kl coef must be >= 0"),
    ("ppo", "length.cm.initial_length=0", r"\.length\.cm: need 0 < initial_length <= max_length"),
    (
        "ppo",
        "length.cm.initial_length=128",
        r"\.length\.cm: need 0 < initial_length <= max_length, got 128, 64",
    ),
    ("ppo", "length.kind=fixed;length.fixed_length=0", r": length\.fixed_length must be >= 1, got 0"),
    ("ppo", "generation.temperature=0", r"\.generation: generation\.temperature must be > 0"),
    ("ppo", "generation.top_p=1.5", r"\.generation: generation\.top_p must be in \(0, 1\]"),
    ("ppo", "generation.top_k=-1", r"\.generation: generation\.top_k must be >= 0"),
    ("ppo", "reward.clip=0", r"\.reward: reward\.clip must be > 0 or null"),
    (
        "ppo",
        "critic.parallel.tensor_model_parallel_size=0",
        r"\.critic\.parallel: tensor_model_parallel_size must",
    ),
    ("ppo", "data.max_prompt_length=0", r"\.data: data\.max_prompt_length must be >= 1, got 0"),
    ("ppo", "data.synthetic.min_len=9", r"\.data\.synthetic: need num_prompts >= 1"),
    ("ppo", "checkpoint.keep_last=0", r"\.checkpoint: checkpoint\.keep_last must be >= 1, got 0"),
    ("ppo", "checkpoint.save_interval=-1", r"\.checkpoint: checkpoint\.save_interval must be >= 0"),
    ("eval", "batch_size=0", r": batch_size must be >= 1, got 0"),
    ("eval", "report_name=a/b", r": report_name must be a file name"),
    ("eval", "responses.top_p=0", r"\.responses: responses\.top_p must be in \(0, 1\]"),
    ("eval", "responses.temperature=0", r"\.responses: responses\.temperature must be > 0"),
    ("eval", "benchmarks.names=[mmlu,hellaswag]", r"\.benchmarks: benchmarks\.names: unknown benchmark"),
    ("eval", "benchmarks.names=[gsm8k:hard]", r"\.benchmarks: benchmarks\.names: benchmark 'gsm8k' has no"),
    ("eval", "benchmarks.limit=0", r"\.benchmarks: benchmarks\.limit must be >= 1 or null, got 0"),
    ("eval", "benchmarks.limits={bbh: -1}", r"\.benchmarks: benchmarks\.limits\.bbh must be >= 1"),
    ("eval", "judge.max_workers=0", r"\.judge: judge\.max_workers must be >= 1, got 0"),
    ("eval", "judge.timeout=0", r"\.judge: judge\.timeout must be > 0, got 0"),
    ("eval", "mt_bench.limit=0", r"\.mt_bench: mt_bench\.limit must be >= 1, got 0"),
    ("eval", "rubric.limit=0", r"\.rubric: rubric\.limit must be >= 1 or null, got 0"),
    ("eval", "rubric.weights={kindness: 1}", r"\.rubric: rubric\.weights: unknown criterion 'kindness'"),
    (
        "eval",
        "rubric.weights={safety: -1}",
        r"\.rubric: rubric\.weights\.safety must be a finite number >= 0",
    ),
    (
        "eval",
        "rubric.weights={clarity: 0, accuracy: 0, completeness: 0, safety: 0, courtesy: 0, comfort: 0, "
        "conciseness: 0, context: 0}",
        r"\.rubric: rubric\.weights: at least one weight must be > 0",
    ),
    ("eval", "mt_bench.base_url=http://x", r"\.mt_bench: unknown field\(s\) base_url"),
    ("pipeline", "rm.nproc=0", r": rm\.nproc must be >= 1, got 0"),
    ("pipeline", "run_dir=''", r": run_dir must not be empty"),
    ("pipeline", "report.samples=-1", r": report\.samples must be >= 0"),
]


@pytest.mark.parametrize(
    ("job", "override", "message"), CONFIG_CASES, ids=[re.sub(r"\W+", "_", c[1]) for c in CONFIG_CASES]
)
def test_config_value_refused_at_load(tmp_path: Path, job: str, override: str, message: str) -> None:
    example = {
        "rm": "rm_cpu.yaml",
        "ppo": "coarse_actor_cpu.yaml",
        "eval": None,
        "pipeline": "pipeline_nano.yaml",
    }[job]
    path = tmp_path / "x.yaml"
    path.write_text((REPO_ROOT / "examples" / example).read_text() if example else "")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))} \\+ overrides{message}") as err:
        load_config(_job(job), path, override.split(";"))
    assert "\n" not in str(err.value)


def test_shipped_examples_still_load() -> None:
    for name, job in [("rm_cpu", "rm"), ("coarse_actor_cpu", "ppo"), ("pipeline_nano", "pipeline")]:
        load_config(_job(job), REPO_ROOT / "examples" / f"{name}.yaml")
    load_config(_job("eval"), None, ["benchmarks.names=[mmlu:anatomy,bbh:navigate,arc_easy]"])
