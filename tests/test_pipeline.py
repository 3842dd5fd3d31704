"""``c2f pipeline``: stage chaining, resume after a crash between stages, and an end-to-end smoke run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from c2f_megatron.config import load_config
from c2f_megatron.pipeline import MARKER, Pipeline, PipelineConfig, StageFailed
from tests.launch import REPO_ROOT, worker_env

NANO = REPO_ROOT / "examples" / "pipeline_nano.yaml"
MINI = REPO_ROOT / "examples" / "pipeline_mini.yaml"
SMOLLM2 = REPO_ROOT / "examples" / "pipeline_smollm2.yaml"
SMOLLM2_ABLATION = REPO_ROOT / "examples" / "pipeline_smollm2_ablation.yaml"
DEMO = REPO_ROOT / "examples" / "pipeline_demo_smollm2.yaml"


def _hh(shared_data: Path) -> list[str]:
    src = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    return [f"hh.source={src}", "hh.max_pairs=300"]


class FakeRunner:
    """Stands in for the stage commands: writes what each real command leaves behind (complete step
    checkpoints, merge outputs, eval tables), records the jobs, and fails on ``fail_on`` commands."""

    def __init__(self, fail_on: str | None = None):
        self.fail_on = fail_on
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, args: list[str], nproc: int, log: Path) -> None:
        command = args[0]
        job = yaml.safe_load(Path(args[1]).read_text()) if command not in ("merge", "convert") else {}
        self.calls.append((command, job))
        if command == self.fail_on:
            raise StageFailed(f"{command} failed (injected)")
        if command in ("train-lm", "train-sft", "train-rm", "coarse-actor"):
            step = Path(job["checkpoint"]["dir"]) / "step_0000002"
            models = ["actor", "critic"] if command == "coarse-actor" else [""]
            for m in models:
                (step / m).mkdir(parents=True, exist_ok=True)
                (step / m / "c2f_checkpoint.json").write_text("{}")
            (step / "trainer_state.json").write_text(json.dumps({"models": models}))
            if command == "coarse-actor":
                lines = [
                    {
                        "step": i,
                        "train/reward_mean": 0.1 * i,
                        "train/rollout_length_limit": 8 * i,
                        "train/length_limit": 8 * i,
                    }
                    for i in (1, 2)
                ]
                (Path(job["logging"]["run_dir"]) / "metrics.jsonl").write_text(
                    "\n".join(json.dumps(x) for x in lines) + "\n"
                )
        elif command == "convert":
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True)
            if args[1] == "hf-to-megatron":
                (out / "c2f_checkpoint.json").write_text("{}")
                (out / "tokenizer").mkdir()
                (out / "tokenizer" / "tokenizer.json").write_text("{}")
            else:
                (out / "config.json").write_text("{}")
                (out / "model.safetensors").write_bytes(b"")
        elif command == "merge":
            out = Path(args[args.index("--out") + 1])
            gammas = args[args.index("--gamma") + 1].split(",")
            out.mkdir(parents=True)  # like c2f merge: OUT itself for one gamma, OUT/gamma_G for a sweep
            for g in gammas if len(gammas) > 1 else []:
                (out / f"gamma_{float(g):.2f}").mkdir()
        elif command == "eval":
            out = Path(job["out_dir"])
            out.mkdir(parents=True, exist_ok=True)
            row = {
                "model": job["name"],
                "checkpoint": job["checkpoint"],
                "length_mean": float(len(self.calls)),
            }
            (out / "eval.json").write_text(json.dumps({"rows": [row]}))
            rewards = [float(len(job["name"]) + i) for i in range(3)]  # longer names score higher
            doc = {
                "prompts": [
                    f"<|im_start|>user\nquestion {i}<|im_end|>\n<|im_start|>assistant\n" for i in range(3)
                ],
                "responses": [f"{job['name']} answer {i}" for i in range(3)],
                "response_ids": [[1] * (i + 1) for i in range(3)],
                "rewards": rewards,
            }
            (out / "responses.json").write_text(json.dumps(doc))


def _config(tmp_path: Path, shared_data: Path, extra: list[str] = ()) -> PipelineConfig:
    return load_config(
        PipelineConfig,
        NANO,
        [f"run_dir={tmp_path / 'run'}", "merge.gammas=0.3,0.7", *_hh(shared_data), *extra],
    )


def test_resume_skips_finished_stages_and_chains_outputs(tmp_path, shared_data):
    cfg = _config(tmp_path, shared_data)
    Pipeline(cfg).validate()
    first = Pipeline(cfg, runner=FakeRunner(fail_on="train-rm"))
    with pytest.raises(StageFailed):
        first.run()
    run = tmp_path / "run"
    assert first.ran == ["base", "sft"]
    assert not (run / "rm" / MARKER).exists()
    before = {s: (run / s / MARKER).stat().st_mtime_ns for s in ("base", "sft")}

    runner = FakeRunner()
    second = Pipeline(cfg, runner=runner)
    report = second.run()
    assert second.skipped == ["base", "sft"]
    assert second.ran == [
        "rm",
        "coarse",
        "merge",
        "eval/sft",
        "eval/gamma_0.30",
        "eval/gamma_0.70",
        "eval/coarse",
    ]
    assert {s: (run / s / MARKER).stat().st_mtime_ns for s in ("base", "sft")} == before
    jobs = dict((c, j) for c, j in runner.calls if c != "eval")
    sft_ckpt = str(run / "sft" / "checkpoints" / "step_0000002")
    assert jobs["train-rm"]["checkpoint"]["init_from"] == sft_ckpt
    assert jobs["coarse-actor"]["actor"]["init_from"] == sft_ckpt
    assert jobs["coarse-actor"]["reward"]["path"] == str(run / "rm" / "checkpoints" / "step_0000002")
    assert jobs["coarse-actor"]["data"]["hh"]["max_pairs"] == 300
    evals = {j["name"]: j for c, j in runner.calls if c == "eval"}
    assert evals["sft"]["baseline"] is None
    assert evals["gamma_0.30"]["baseline"] == str(run / "eval" / "sft")
    assert evals["gamma_0.70"]["checkpoint"] == str(run / "merge" / "sweep" / "gamma_0.70")
    assert evals["coarse"]["checkpoint"] == str(run / "coarse" / "checkpoints" / "step_0000002" / "actor")
    table = json.loads((report / "table.json").read_text())["rows"]
    assert [(r["model"], r["gamma"]) for r in table] == [
        ("sft", None),
        ("gamma_0.30", 0.3),
        ("gamma_0.70", 0.7),
        ("coarse", None),
    ]
    assert (report / "ppo_curves.png").stat().st_size > 1000
    assert (report / "metrics_vs_gamma.png").stat().st_size > 1000

    third = Pipeline(cfg, runner=FakeRunner(fail_on="train-lm"))
    third.run()  # everything done: nothing runs, the report is rewritten
    assert third.ran == []


def test_instruct_partner_variants_pairs_and_reuse(tmp_path, shared_data):
    """The SmolLM2 layout: a packaged GGUF base converted (GGUF -> HF -> Megatron), no SFT (the instruct
    model is the partner and the RM's init), Plus as a merged variant, pairwise win rates; then an ablation
    run that reuses the finished stages and takes its fixed length from the CM run."""
    cfg = load_config(
        PipelineConfig,
        SMOLLM2,
        [f"run_dir={tmp_path / 'main'}", "merge.gammas=0.5,0.7", *_hh(shared_data)],
    )
    Pipeline(cfg).validate()
    runner = FakeRunner()
    main = Pipeline(cfg, runner=runner)
    report = main.run()
    run = tmp_path / "main"
    commands = [(c, j.get("name")) for c, j in runner.calls]
    assert [c for c, _ in commands[:2]] == ["convert", "convert"] and "train-sft" not in dict(commands)
    converted = run / "base" / "converted"
    jobs = [j for c, j in runner.calls if c in ("train-rm", "coarse-actor")]
    assert all(j["data"]["tokenizer"] == str(converted / "tokenizer") for j in jobs)
    rm_job, coarse_job, plus_job = jobs
    assert rm_job["checkpoint"]["init_from"] == str(converted)
    assert coarse_job["actor"]["init_from"] == plus_job["actor"]["init_from"] == str(converted)
    assert (
        coarse_job["generation"]["suppress_eos"] is True and plus_job["generation"]["suppress_eos"] is False
    )
    assert plus_job["length"]["kind"] == "fixed" and plus_job["data"]["system_prompt"] is None
    table = json.loads((report / "table.json").read_text())["rows"]
    assert [r["model"] for r in table] == [
        "instruct", "gamma_0.50", "gamma_0.70", "coarse", "plus", "plus_gamma_0.70",
    ]  # fmt: skip
    evals = {j["name"]: j for c, j in runner.calls if c == "eval"}
    assert evals["plus_gamma_0.70"]["checkpoint"] == str(run / "merge_plus" / "sweep")
    assert evals["instruct"]["baseline"] is None and evals["coarse"]["baseline"] == str(run / "eval/instruct")
    pairs = json.loads((report / "pairwise.json").read_text())["rows"]
    assert [(x["a"], x["b"], x["win_rate_a_over_b"]) for x in pairs] == [
        ("gamma_0.70", "plus_gamma_0.70", 0.0),
        ("plus_gamma_0.70", "plus", 1.0),
    ]
    assert (report / "summary.md").read_text().count("![") >= 3
    assert (report / "pairwise_win_rates.png").stat().st_size > 1000

    ablation = load_config(
        PipelineConfig,
        SMOLLM2_ABLATION,
        [f"run_dir={tmp_path / 'ablation'}", f"reuse={run}", "merge.gammas=0.7", *_hh(shared_data)],
    )
    runner = FakeRunner()
    second = Pipeline(ablation, runner=runner)
    report = second.run()
    assert {"base", "rm", "coarse", "merge", "eval/instruct", "eval/coarse"} <= set(second.skipped)
    ppo = [j for c, j in runner.calls if c == "coarse-actor"]
    assert [j["logging"]["run_dir"] for j in ppo] == [
        str(tmp_path / "ablation" / n) for n in ("fixed", "step")
    ]
    assert ppo[0]["length"] == {"kind": "fixed", "fixed_length": 16}  # the CM run's last limit
    assert ppo[0]["reward"]["path"] == str(run / "rm" / "checkpoints" / "step_0000002")
    assert ppo[1]["length"]["kind"] == "step"
    table = json.loads((report / "table.json").read_text())["rows"]
    assert [r["model"] for r in table][:3] == ["instruct", "gamma_0.70", "coarse"]


def test_demo_summary_sets_before_and_after_side_by_side(tmp_path, shared_data):
    """The main job's config: one gamma, three rows, and a summary with the Coarse Actor's first and last
    iteration and the instruct model's and the Fine Actor's answers to the same prompts."""
    from c2f_megatron.pipeline.report import run_summary

    cfg = load_config(PipelineConfig, DEMO, [f"run_dir={tmp_path / 'demo'}", *_hh(shared_data)])
    pipeline = Pipeline(cfg, runner=FakeRunner())
    report = pipeline.run()
    summary = run_summary(pipeline, 12.0, report)
    assert [r["model"] for r in json.loads((report / "table.json").read_text())["rows"]] == [
        "instruct", "gamma_0.70", "coarse",
    ]  # fmt: skip
    metrics = {name: (a, b) for name, a, b in summary.metrics}
    assert metrics["coarse rollout_length_limit (first -> last iteration)"] == (8.0, 16.0)
    assert metrics["length_mean (instruct -> gamma_0.70)"][0] is not None
    assert [s.title.split(" (")[0] for s in summary.samples] == [
        "prompt 1, instruct", "prompt 1, gamma_0.70", "prompt 2, instruct", "prompt 2, gamma_0.70",
        "prompt 3, instruct", "prompt 3, gamma_0.70",
    ]  # fmt: skip
    assert summary.samples[0].prompt == "question 0" and summary.samples[1].response == "gamma_0.70 answer 0"
    text = summary.markdown()
    assert "question 2" in text and "instruct answer 2" in text and str(report / "summary.md") in text
    assert summary.console().count("\n--- prompt") == 6


def test_config_errors_name_the_field(tmp_path, shared_data, capsys):
    from c2f_megatron.pipeline import main

    assert main(str(NANO), [f"run_dir={tmp_path}", "sft.job.train.trian_steps=3"]) == 2
    assert "sft.job" in capsys.readouterr().err
    assert main(str(NANO), [f"run_dir={tmp_path}", "merge.gammas=0.5:0.2:0.1"]) == 2
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize("path", [NANO, MINI, SMOLLM2, SMOLLM2_ABLATION, DEMO])
def test_shipped_configs_validate(path, tmp_path):
    Pipeline(load_config(PipelineConfig, path, [f"run_dir={tmp_path}"])).validate()


SMOKE = [
    "base.job.train.train_steps=3",
    "base.job.train.micro_batch_size=4",
    "base.job.train.global_batch_size=4",
    "sft.job.train.train_steps=3",
    "sft.job.train.micro_batch_size=4",
    "sft.job.train.global_batch_size=4",
    "rm.job.train.train_steps=3",
    "rm.job.train.micro_batch_size=4",
    "rm.job.train.global_batch_size=4",
    "coarse.job.ppo.iterations=2",
    "coarse.job.ppo.rollout_batch_size=4",
    "coarse.job.ppo.mini_batch_size=4",
    "coarse.job.ppo.micro_batch_size=4",
    "coarse.job.ppo.critic_warmup_iterations=0",
    "coarse.job.length.cm.initial_length=8",
    "coarse.job.length.cm.max_length=16",
    "merge.gammas=0.3,0.7",
    "eval.job.responses.num_prompts=4",
    "eval.job.responses.num_references=4",
    "eval.job.responses.max_new_tokens=12",
    "eval.job.benchmarks.names=[]",
]


def _pipeline(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "c2f_megatron.cli", "pipeline", str(NANO), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=worker_env(2),
        cwd=REPO_ROOT,
    )


def test_nano_smoke_end_to_end_with_crash_and_resume(tmp_path, shared_data):
    """The shipped nano config, shortened: the RM stage crashes (an architecture override its SFT init
    refuses), the rerun resumes there, and the report comes out."""
    run = tmp_path / "run"
    args = [f"run_dir={run}", *_hh(shared_data), *SMOKE]
    bad = _pipeline([*args, "rm.job.model.overrides.num_layers=3"])
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert "stage" in bad.stderr or "rm" in bad.stderr
    assert (run / "sft" / MARKER).is_file() and not (run / "rm" / MARKER).exists()
    sft_marker = (run / "sft" / MARKER).read_text()
    base_log = (run / "base" / "stage.log").stat().st_size

    good = _pipeline(args)
    assert good.returncode == 0, good.stderr[-5000:]
    assert (run / "sft" / MARKER).read_text() == sft_marker
    assert (run / "base" / "stage.log").stat().st_size == base_log  # base never ran again
    assert "skipped" in good.stderr
    table = json.loads((run / "report" / "table.json").read_text())["rows"]
    assert [r["model"] for r in table] == ["sft", "gamma_0.30", "gamma_0.70", "coarse"]
    for r in table:
        assert r["n_prompts"] == 4 and 1 <= r["length_mean"] <= 12 and r["perplexity"] > 1
        assert (r["win_rate"] is None) == (r["model"] == "sft")
    assert (run / "report" / "ppo_curves.png").stat().st_size > 1000
    assert (run / "report" / "metrics_vs_gamma.png").stat().st_size > 1000
    # every job's summary, and the pipeline's own at the end of its output
    assert "c2f pipeline: 7 stage(s) run, 2 done earlier" in good.stdout
    assert (run / "summary.md").is_file() and (run / "coarse" / "summary.md").is_file()
    assert (run / "coarse" / "ppo_curves.png").stat().st_size > 1000
    assert "iteration 2:" in (run / "coarse" / "summary.md").read_text()  # the last iteration's sample
    assert re.search(r"^    iter 2/2 \| ", good.stdout, re.M)  # a stage's progress lines reach the console


class _ScriptedJudge:
    """Judge stand-in: MT-Bench grade 5, a pairwise game won by the answer of the longer row name (names
    are in the answers as ``<<name>>``), rubric passes everything but conciseness for merged rows."""

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def complete(self, messages: list[dict]) -> str:
        from c2f_megatron.eval.rubric import CRITERIA, SYSTEM_PROMPT

        with self.lock:
            self.calls += 1
        system, user = messages[0]["content"], messages[1]["content"]
        if system == SYSTEM_PROMPT:
            fail = "gamma" in user.rsplit("[The Start of the Assistant's Answer]", 1)[1]
            return "\n".join(
                f"{c}: [[{'FAIL' if fail and c == 'conciseness' else 'PASS'}]]" for c in CRITERIA
            )
        if "[[A]]" in system:
            names = re.findall(r"<<(.+?)>>", user)
            a, b = len(names[0]), len(names[-1])
            return "[[A]]" if a > b else "[[B]]" if b > a else "[[C]]"
        return "Rating: [[5]]"


class JudgedFakeRunner(FakeRunner):
    """``FakeRunner`` whose evals also write ``mt_bench.json`` / ``rubric.json`` through ``c2f eval``'s own
    judging functions, with scripted answers and a scripted judge."""

    def __init__(self):
        super().__init__()
        self.judge = _ScriptedJudge()

    def __call__(self, args: list[str], nproc: int, log: Path) -> None:
        super().__call__(args, nproc, log)
        if args[0] != "eval":
            return
        from c2f_megatron.config import from_dict
        from c2f_megatron.eval import mt_bench as mtb
        from c2f_megatron.eval.config import EvalConfig
        from c2f_megatron.eval.judged import mt_bench_doc, reusable_rubric, rubric_doc

        job = self.calls[-1][1]
        cfg = from_dict(EvalConfig, job)
        out, name = Path(cfg.out_dir), cfg.name
        questions = mtb.load_questions(cfg.mt_bench.questions)[: cfg.mt_bench.limit]
        answers = {q.question_id: (f"<<{name}>> 1", f"<<{name}>> 2") for q in questions}
        doc = json.loads((out / "responses.json").read_text())
        sides = [(name, "model", doc["prompts"], doc["responses"], None)]
        baseline = None
        if cfg.baseline:
            base = Path(cfg.baseline)
            base_mt = json.loads((base / "mt_bench.json").read_text())
            baseline = (base_mt["model"], mtb.load_answers(base / "mt_bench.json", questions), base_mt)
            base_doc = json.loads((base / "responses.json").read_text())
            reuse = reusable_rubric(base, cfg)
            sides.append((base_mt["model"], "baseline", base_doc["prompts"], base_doc["responses"], reuse))
        judge = self.judge
        mt_doc = mt_bench_doc(cfg, judge, name, questions, answers, baseline)
        (out / "mt_bench.json").write_text(json.dumps(mt_doc))
        (out / "rubric.json").write_text(json.dumps(rubric_doc(cfg, judge, sides)))


def test_report_gathers_judged_evaluations(tmp_path, shared_data):
    """Each row's mt_bench.json / rubric.json become report/mt_bench.* and report/rubric.* with charts,
    naming the judge and the caller's caveat; the pairwise games are against the partner."""
    from c2f_megatron.pipeline.report import run_summary

    mt = shared_data / "mt_bench"
    judge = [
        "eval.job.judge.base_url=http://judge.invalid/v1",
        "eval.job.judge.model=tiny-judge",
        "eval.job.judge.note='tiny-judge is a small local model, far weaker than GPT-4'",
        f"eval.job.mt_bench.questions={mt}/question.jsonl",
        f"eval.job.mt_bench.judge_prompts={mt}/judge_prompts.jsonl",
        f"eval.job.mt_bench.reference_answers={mt}/reference_answer/gpt-4.jsonl",
        "eval.job.mt_bench.limit=3",
    ]
    runner = JudgedFakeRunner()
    pipeline = Pipeline(_config(tmp_path, shared_data, judge), runner=runner)
    report = pipeline.run()
    # 4 rows x (2 grades x 3 questions + 3 rubric items) + 3 rows x 6 pairs x 2 orders; the partner's
    # responses are judged once: the other rows reuse its rubric.json
    assert runner.judge.calls == 4 * (6 + 3) + 3 * 12
    mt_rows = json.loads((report / "mt_bench.json").read_text())["rows"]
    names = [r["model"] for r in json.loads((report / "table.json").read_text())["rows"]]
    assert [r["model"] for r in mt_rows] == names and names[0] == pipeline.partner
    assert {r["overall"] for r in mt_rows} == {5.0} and {r["judge"] for r in mt_rows} == {"tiny-judge"}
    assert "win_rate" not in mt_rows[0]  # the partner plays no games against itself
    by_name = {r["model"]: r for r in mt_rows}
    assert by_name["coarse"]["win_rate"] == 1.0  # "coarse" is longer than "sft": wins every game
    assert by_name["gamma_0.30"]["wins"] == 6 and by_name["gamma_0.30"]["baseline"] == "sft"
    rubric_rows = json.loads((report / "rubric.json").read_text())["rows"]
    assert [r["model"] for r in rubric_rows] == names and {r["role"] for r in rubric_rows} == {"model"}
    rubric = {r["model"]: r for r in rubric_rows}
    assert rubric["sft"]["score"] == 1.0 and rubric["gamma_0.30"]["conciseness"] == 0.0
    assert rubric["gamma_0.30"]["score"] == pytest.approx(7 / 8)
    row_doc = json.loads((tmp_path / "run" / "eval" / "gamma_0.30" / "rubric.json").read_text())
    assert [(m["role"], m["reused"]) for m in row_doc["models"]] == [("model", False), ("baseline", True)]
    text = (report / "summary.md").read_text()
    assert "## Judged evaluations" in text and "`tiny-judge`" in text and "far weaker than GPT-4" in text
    assert "equal by default" in text
    assert "far weaker than GPT-4" in (report / "mt_bench.md").read_text()
    for png in ("mt_bench_by_category.png", "mt_bench_pairwise.png", "rubric.png"):
        assert (report / png).stat().st_size > 1000 and f"({png})" in text
    outputs = run_summary(pipeline, 1.0, report).outputs
    assert outputs["mt_bench table"] == str(report / "mt_bench.md") and "rubric table" in outputs
