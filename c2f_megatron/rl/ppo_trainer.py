"""The Coarse Actor PPO loop: it only orchestrates the workers.

One iteration::

    prompts (this actor-DP rank's slice of the seeded prompt stream)
    -> actor.generate at the length controller's limit (EOS suppressed: coarse mode;   [rollout]
       or EOS ends a response: ordinary PPO, the Plus baseline)
    -> rows gathered over the actor's DP ranks: every rank holds the whole batch
    -> actor log-probs, reference log-probs, critic values, reward scores, each role   [scoring]
       on its own TP/PP layout and its own DP slice of the rows
    -> KL penalty, token rewards, GAE, whitened advantages (experience.finalize)
    -> PPO epochs over shuffled minibatches: critic step, actor step (after warm-up)    [training]
    -> KL controller and length controller (Continuous Maximization) updates
    -> log, checkpoint

Besides the PPO statistics, every iteration logs the time of each phase (``time_*_s``), throughput per rank,
MFU (on a GPU we know the peak of), peak memory per phase (GPU) or the process's peak RSS (CPU), and the
EOS mass: the probability the actor would put on the suppressed EOS and stop ids at each response position
(``eos_mass_*``). README "PPO metrics and their verl names" lists them.

Everything an iteration draws is a function of (ppo.seed, iteration): the prompt order, the sampling seed of
every row and the minibatch shuffles, whatever the data-parallel split. So a resumed run (actor, critic, optimizers, KL/length controllers from the
checkpoint) reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from c2f_megatron.data.chat import last_user_turn
from c2f_megatron.generation.rollout import GenerationConfig
from c2f_megatron.platform.distributed import is_rank_zero, use_cuda
from c2f_megatron.rl.config import PPOJobConfig, SampleLogConfig
from c2f_megatron.rl.experience import (
    Experience,
    experience_metrics,
    finalize,
    gather_experience,
    normalize_scores,
)
from c2f_megatron.rl.kl_control import build_kl_controller
from c2f_megatron.rl.length_control import build_length_controller
from c2f_megatron.rl.prompts import PromptSource, iteration_prompts
from c2f_megatron.rl.roles import Workers, build_workers
from c2f_megatron.rl.workers import RewardModelWorker
from c2f_megatron.training.checkpointing import (
    ModelState,
    TrainerState,
    load_training_checkpoint,
    resume_checkpoint,
    save_training_checkpoint,
)
from c2f_megatron.training.logging import WANDB_ID_KEY, MetricsLogger
from c2f_megatron.training.perf import (
    PhaseTimer,
    memory_metrics,
    mfu_metrics,
    peak_flops,
    sequence_flops,
    world_size,
)
from c2f_megatron.training.run_loop import LoopSettings, StepOutcome, run_loop
from c2f_megatron.training.summary import (
    RunSummary,
    Sample,
    history_by_step,
    job_outputs,
    plot_ppo_curves,
    read_metrics_jsonl,
    start_end,
    stopped_progress,
)

logger = logging.getLogger(__name__)

ACTOR, CRITIC = "actor", "critic"


# --------------------------------------------------------------------------------------------------- loop


@dataclass
class RunResult:
    iteration: int
    history: list[dict[str, Any]]
    checkpoint: Path | None


def _average(results: list[dict[str, float]]) -> dict[str, float]:
    keys = results[0].keys() if results else []
    return {k: sum(r[k] for r in results) / len(results) for k in keys}


def make_experience(
    w: Workers,
    cfg: PPOJobConfig,
    prompts: list[list[int]],
    row_offset: int,
    length: int,
    iteration: int,
    kl_coef: float,
    timer: PhaseTimer,
) -> Experience:
    """Rollout of this rank's prompts (rows ``row_offset...`` of the iteration's batch), gathered over the
    actor's data-parallel ranks, then scoring by every role; returns the whole batch's experience (the same
    on every rank). ``timer`` times each phase."""
    gen = GenerationConfig(
        max_new_tokens=length,
        temperature=cfg.generation.temperature,
        top_k=cfg.generation.top_k,
        top_p=cfg.generation.top_p,
        suppress_ids=list(w.actor.suppressed),
        stop_ids=[] if cfg.generation.suppress_eos else [w.source.eos_id, *cfg.generation.extra_stop_ids],
        pad_id=w.source.pad_id,
        seed=cfg.ppo.seed * 1_000_003 + iteration,
        cuda_graph=cfg.generation.cuda_graph,
    )
    with timer.phase("rollout"):
        local = Experience.from_rollout(w.actor.generate(prompts, gen, row_offset))
        exp = gather_experience(local, w.actor.layout, w.source.pad_id)
    with timer.phase("actor_logprobs"):
        exp.old_logprobs, exp.entropy, exp.eos_mass = w.actor.compute_log_probs(exp)
    with timer.phase("ref_logprobs"):
        exp.ref_logprobs = w.reference.compute_log_probs(exp)
    with timer.phase("values"):
        exp.values = w.critic.compute_values(exp)
    with timer.phase("reward"):
        exp.raw_scores = w.reward.score(exp)
        exp.scores = normalize_scores(exp.raw_scores, w.reward.mean, w.reward.std, cfg.reward.clip)
    ppo = cfg.ppo
    with timer.phase("gae"):
        finalize(exp, kl_coef, ppo.kl_estimator, ppo.gamma, ppo.lam, ppo.whiten_advantages)
    return exp


def ppo_update(
    w: Workers,
    cfg: PPOJobConfig,
    exp: Experience,
    iteration: int,
    update_actor: bool,
    timer: PhaseTimer | None = None,
):
    """``ppo.epochs`` passes over shuffled minibatches of the whole batch (the same shuffle on every rank);
    one critic (and actor) optimizer step per minibatch, each role on its data-parallel slice of it.
    ``timer`` sums the critic's and the actor's steps (``critic_update``, ``actor_update``)."""
    timer = timer or PhaseTimer(use_cuda())
    mini_rows = cfg.ppo.mini_batch_size
    gen = torch.Generator().manual_seed(cfg.ppo.seed * 7_919 + iteration)
    actor_steps, critic_steps = [], []
    skipped = 0
    for _ in range(cfg.ppo.epochs):
        order = torch.randperm(len(exp), generator=gen)
        for start in range(0, len(exp), mini_rows):
            mini = exp.select(order[start : start + mini_rows].to(exp.tokens.device))
            with timer.phase("critic_update"):
                c = w.critic.update(mini, cfg.ppo.value_clip)
            critic_steps.append({**c.metrics, "critic_grad_norm": c.grad_norm, "critic_lr": c.lr})
            skipped += int(c.skipped)
            if update_actor:
                with timer.phase("actor_update"):
                    a = w.actor.update(mini, cfg.ppo.clip_eps)
                actor_steps.append({**a.metrics, "actor_grad_norm": a.grad_norm, "actor_lr": a.lr})
                skipped += int(a.skipped)
    out = _average(critic_steps)
    out.update(_average(actor_steps))
    out["skipped_steps"] = float(skipped)
    return out


# The phases an iteration times (``time_<phase>_s``); scoring is the four between rollout and GAE.
PHASES = (
    "rollout", "actor_logprobs", "ref_logprobs", "values", "reward", "gae", "critic_update", "actor_update"
)  # fmt: skip
SCORING = ("actor_logprobs", "ref_logprobs", "values", "reward")


def phase_flops(w: Workers, exp: Experience, epochs: int, update_actor: bool) -> dict[str, float]:
    """Model FLOPs of each phase of an iteration over ``exp`` (``training.perf``'s formula), whole batch."""
    lengths = (exp.prompt_mask.sum(1) + exp.response_mask.sum(1)).tolist()
    actor, ref, critic = w.actor.role.model_cfg, w.reference.role.model_cfg, w.critic.role.model_cfg
    flops = {
        "rollout": sequence_flops(actor, lengths, training=False),
        "actor_logprobs": sequence_flops(actor, lengths, training=False),
        "ref_logprobs": sequence_flops(ref, lengths, training=False),
        "values": sequence_flops(critic, lengths, training=False, lm_head=False),
        "critic_update": epochs * sequence_flops(critic, lengths, training=True, lm_head=False),
        "actor_update": epochs * sequence_flops(actor, lengths, training=True) if update_actor else 0.0,
    }
    if isinstance(w.reward, RewardModelWorker):
        flops["reward"] = sequence_flops(w.reward.role.model_cfg, lengths, training=False, lm_head=False)
    return flops


def perf_metrics(
    w: Workers, exp: Experience, timer: PhaseTimer, seconds: float, epochs: int, update_actor: bool
) -> dict[str, float]:
    """Phase times, throughput per rank, MFU (a GPU we know the peak of) and peak memory (max over ranks)."""
    world = world_size()
    t = {p: timer.seconds.get(p, 0.0) for p in PHASES}
    out = {f"time_{p}_s": t[p] for p in PHASES}
    out["time_scoring_s"] = sum(t[p] for p in SCORING)
    response_tokens = float(exp.response_mask.sum())
    tokens = response_tokens + float(exp.prompt_mask.sum())
    out["gen_tokens_per_s_per_rank"] = response_tokens / max(t["rollout"], 1e-9) / world
    out["tokens_per_s_per_rank"] = tokens / max(seconds, 1e-9) / world
    peak = peak_flops()
    if peak is not None:
        out.update(mfu_metrics(phase_flops(w, exp, epochs, update_actor), t, seconds, peak))
    out.update(memory_metrics(timer))
    return out


def run(cfg: PPOJobConfig, config_dump: dict[str, Any] | None = None) -> RunResult:
    """Train the coarse actor as configured. Call after ``init_distributed(cfg.parallel)``."""
    w = build_workers(cfg)
    dp_size, dp_rank = w.actor.layout.dp, w.actor.layout.dp_rank
    kl_ctl = build_kl_controller(cfg.kl)
    length_ctl = build_length_controller(cfg.length)
    actor, critic = w.actor.role, w.critic.role
    ck = cfg.checkpoint
    models = [
        ModelState(actor.chunks, w.actor_meta, actor.optimizer if ck.save_optimizer else None, ACTOR),
        ModelState(critic.chunks, w.critic_meta, critic.optimizer if ck.save_optimizer else None, CRITIC),
    ]
    state = TrainerState()
    resume_dir = resume_checkpoint(ck.dir) if (ck.dir and ck.resume) else None
    if resume_dir is not None:
        state = load_training_checkpoint(resume_dir, models, load_optimizer=ck.save_optimizer)
        extra = state.extra
        actor.scheduler.load_state_dict(extra["actor_scheduler"])
        critic.scheduler.load_state_dict(extra["critic_scheduler"])
        kl_ctl.load_state_dict(extra["kl_controller"])
        length_ctl.load_state_dict(extra["length_controller"])

    log = MetricsLogger(
        cfg.logging,
        cfg.ppo.iterations,
        config_dump,
        start_step=state.step,
        console_keys=CONSOLE_KEYS,
        unit="iter",
        checkpoint_run_id=state.extra.get(WANDB_ID_KEY),
    )
    samples = SampleLog(Path(cfg.logging.run_dir) / SAMPLES_FILE, w.source.decode, cfg.samples, log)
    save_seconds = 0.0  # the last checkpoint save's, reported by the next iteration
    if resume_dir is not None:
        log.message(f"resumed from {resume_dir} at iteration {state.step}")
    log.message(
        f"coarse-actor: {len(w.source.prompts)} prompts, {cfg.ppo.rollout_batch_size} per iteration; "
        f"{w.layouts.describe()}; reward {cfg.reward.kind}, length limit {length_ctl.length}"
    )

    def save() -> Path | None:
        nonlocal save_seconds
        if not ck.dir:
            return None
        t0 = time.perf_counter()
        state.extra = {
            "actor_scheduler": actor.scheduler.state_dict(),
            "critic_scheduler": critic.scheduler.state_dict(),
            "kl_controller": kl_ctl.state_dict(),
            "length_controller": length_ctl.state_dict(),
            "prompt_position": state.consumed_samples,
            **({WANDB_ID_KEY: log.run_id} if log.run_id else {}),
        }
        path = save_training_checkpoint(ck.dir, models, state, keep_last=ck.keep_last)
        save_seconds = time.perf_counter() - t0
        log.message(f"saved {path} ({save_seconds:.1f} s)")
        return path

    def iteration(it: int) -> StepOutcome:
        nonlocal save_seconds
        t0 = time.perf_counter()
        prompts, row_offset = iteration_prompts(
            w.source, it, cfg.ppo.rollout_batch_size, cfg.ppo.seed, dp_rank, dp_size
        )
        length, kl_coef = length_ctl.length, kl_ctl.value
        timer = PhaseTimer(use_cuda())
        exp = make_experience(w, cfg, prompts, row_offset, length, it, kl_coef, timer)
        record: dict[str, Any] = experience_metrics(exp)
        samples.write(it + 1, exp, cfg.ppo.iterations)
        t1 = time.perf_counter()
        update_actor = it >= cfg.ppo.critic_warmup_iterations
        record.update(ppo_update(w, cfg, exp, it, update_actor, timer))
        record["time_training_s"] = time.perf_counter() - t1
        kl_ctl.update(record["kl_per_seq"], cfg.ppo.rollout_batch_size)
        decision = length_ctl.update(record["reward_mean"], record["vf_loss"])
        seconds = time.perf_counter() - t0
        record.update(perf_metrics(w, exp, timer, seconds, cfg.ppo.epochs, update_actor))
        record["time_save_s"], save_seconds = save_seconds, 0.0  # the save after the previous iteration
        record.update(
            kl_coef=kl_coef,
            rollout_length_limit=float(length),  # the limit this iteration was rolled out at
            cm_input_reward=record["reward_mean"],
            cm_input_critic_loss=record["vf_loss"],
            actor_updated=float(update_actor),
            iteration_time_s=seconds,
            tokens_per_s=float(exp.tokens.numel()) / max(seconds, 1e-9),  # the whole batch (every rank)
        )
        record.update(decision.metrics())  # length_limit: the limit for the next iteration
        return StepOutcome(record, record["skipped_steps"] > 0, cfg.ppo.rollout_batch_size)

    settings = LoopSettings(
        total_steps=cfg.ppo.iterations,
        save_interval=ck.save_interval,
        exit_after=ck.exit_after_iterations,
        max_consecutive_nonfinite=cfg.ppo.max_consecutive_nonfinite,
        unit="iteration",
        exit_field="checkpoint.exit_after_iterations",
        nonfinite_field="ppo.max_consecutive_nonfinite",
    )
    loop = run_loop(settings, state, iteration, save, log, resume_dir)
    if is_rank_zero():
        run_summary(cfg, log.elapsed(), state.step, loop.stopped, loop.last_saved, w.source).finish()
    return RunResult(state.step, loop.history, loop.last_saved)


# --------------------------------------------------------------------------------------------- summary

# The compact console line: (metric, label); every metric is in metrics.jsonl and wandb.
CONSOLE_KEYS = (
    ("reward_raw_mean", "rm"),
    ("vf_loss", "vf"),
    ("kl", "kl"),
    ("entropy", "ent"),
    ("response_length_mean", "len"),
    ("rollout_length_limit", "limit"),
    ("tokens_per_s", "tok/s"),
)
SUMMARY_KEYS = (
    "reward_raw_mean",
    "reward_mean",
    "vf_loss",
    "kl",
    "entropy",
    "response_length_mean",
    "rollout_length_limit",
    "hit_limit_frac",
    "iteration_time_s",
)
SAMPLES_FILE = "samples.jsonl"


SAMPLE_COLUMNS = ("step", "row", "prompt", "response", "length", "reward", "eos_mass")


class SampleLog:
    """The first ``cfg.rows`` rows of the batch, decoded, at the first, the last and every ``cfg.every``-th
    iteration: to ``<run_dir>/samples.jsonl`` and a wandb Table ``samples`` (rank 0). ``reward``: the raw
    score; ``eos_mass``: the row's mean EOS mass (null in plain PPO)."""

    def __init__(self, path: Path, decode, cfg: SampleLogConfig, log: MetricsLogger):
        self.path, self.decode, self.cfg, self.log = path, decode, cfg, log

    def due(self, step: int, total: int) -> bool:
        return self.cfg.rows > 0 and (step == 1 or step == total or step % self.cfg.every == 0)

    def write(self, step: int, exp: Experience, total: int) -> None:
        if not is_rank_zero() or not self.due(step, total):
            return
        rows = []
        for i in range(min(self.cfg.rows, len(exp))):
            prompt = exp.tokens[i, : exp.prompt_width][exp.prompt_mask[i]].tolist()
            response = exp.tokens[i, exp.prompt_width :][exp.response_mask[i]].tolist()
            mass = None
            if exp.eos_mass is not None:
                mass = float(exp.eos_mass[i][exp.response_mask[i]].double().mean())
            values = (step, i, self.decode(prompt), self.decode(response), len(response))
            rows.append((*values, float(exp.raw_scores[i]), mass))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(dict(zip(SAMPLE_COLUMNS, r))) + "\n" for r in rows)
        self.log.log_table(step, "samples", SAMPLE_COLUMNS, rows)


def run_summary(
    cfg: PPOJobConfig, seconds: float, step: int, stopped: str, checkpoint: Path | None, source: PromptSource
) -> RunSummary:
    """What the run did, from its ``metrics.jsonl`` and ``samples.jsonl``: start/end metrics, the PPO
    curves plot, and the first and last iteration's sample response."""
    run_dir = Path(cfg.logging.run_dir)
    records = read_metrics_jsonl(run_dir / "metrics.jsonl", "train")
    plot = None
    if history_by_step(records, "reward_mean"):
        plot = plot_ppo_curves({"coarse-actor": records}, run_dir / "ppo_curves.png")
    summary = RunSummary(
        "coarse-actor",
        run_dir,
        seconds,
        stopped_progress(step, cfg.ppo.iterations, "iteration", stopped),
        job_outputs(
            run_dir,
            checkpoint,
            cfg.logging,
            plot=plot,
            samples=run_dir / SAMPLES_FILE,
            skipped_records=source.skipped_records,
        ),
        start_end(records, SUMMARY_KEYS),
    )
    firsts = [r for r in read_metrics_jsonl(run_dir / SAMPLES_FILE) if r.get("row", 0) == 0]
    shown = history_by_step(firsts, "response")
    for row in shown[:1] + shown[1:][-1:]:
        summary.samples.append(
            Sample(
                f"iteration {row['step']}: {row['length']} tokens, RM score {row['reward']:.3f}",
                last_user_turn(row["prompt"]),
                row["response"],
            )
        )
    return summary
