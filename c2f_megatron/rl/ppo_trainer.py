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

Everything an iteration draws is a function of (ppo.seed, iteration): the prompt order, the sampling seed of
every row and the minibatch shuffles, whatever the data-parallel split. So a resumed run (actor, critic, optimizers, KL/length controllers from the
checkpoint) reproduces the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from c2f_megatron.checkpoint import METADATA_FILE
from c2f_megatron.checkpoint.megatron_dir import (
    CheckpointError,
    CheckpointMetadata,
    read_metadata,
    unwrap_model,
)
from c2f_megatron.models.config import ModelConfig
from c2f_megatron.platform.role_layout import RoleLayout, build_role_layout, global_layout
from c2f_megatron.rl.config import PPOJobConfig
from c2f_megatron.rl.experience import (
    Experience,
    experience_metrics,
    finalize,
    gather_experience,
    normalize_scores,
)
from c2f_megatron.rl.kl_control import build_kl_controller
from c2f_megatron.rl.length_control import build_length_controller
from c2f_megatron.rl.rollout import GenerationConfig
from c2f_megatron.rl.workers import (
    ActorWorker,
    CriticWorker,
    FrozenChunks,
    ReferenceWorker,
    RewardFunction,
    RewardModelWorker,
    TokenFrequencyReward,
)
from c2f_megatron.training.checkpointing import (
    TRAINER_STATE_FILE,
    ModelState,
    TrainerState,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from c2f_megatron.training.logging import MetricsLogger
from c2f_megatron.training.loop import setup_training
from c2f_megatron.training.preemption import PreemptionHandler

logger = logging.getLogger(__name__)

ACTOR, CRITIC = "actor", "critic"


# ------------------------------------------------------------------------------------------------ prompts


@dataclass
class PromptSource:
    """Tokenised prompts plus the ids the rollout needs (EOS/pad) and tokenizer info for checkpoints."""

    prompts: list[list[int]]
    eos_id: int
    pad_id: int
    vocab_size: int
    tokenizer: dict[str, Any] | None = None


def load_prompts(cfg: PPOJobConfig, model_vocab: int) -> PromptSource:
    data = cfg.data
    if data.source == "synthetic":
        syn = data.synthetic
        if not 0 <= syn.low < model_vocab or not 1 <= syn.min_len <= syn.max_len:
            raise ValueError(
                f"data.synthetic: need 0 <= low < vocab {model_vocab} and 1 <= min_len <= max_len"
            )
        rng = random.Random(cfg.ppo.seed)
        prompts = [
            [rng.randrange(syn.low, model_vocab) for _ in range(rng.randint(syn.min_len, syn.max_len))]
            for _ in range(syn.num_prompts)
        ]
        return PromptSource(prompts, eos_id=2, pad_id=0, vocab_size=model_vocab)
    from c2f_megatron.data import ChatFormat, encode_prompts, load_from_config, load_tokenizer, prompts_for_rl

    tokenizer = load_tokenizer(data.tokenizer)
    chat = ChatFormat(data.hh.prompt_format, tokenizer)
    hh = load_from_config(data.hh)
    texts = prompts_for_rl(hh.train, chat, data.system_prompt)
    stops = [tokenizer.eos_id, tokenizer.pad_id, *cfg.generation.extra_stop_ids]
    prompts = [ids for _, ids in encode_prompts(chat, texts, stops, data.max_prompt_length, data.overlong)]
    if not prompts:
        raise ValueError(
            f"data.hh.source {data.hh.source}: no prompts (data.max_prompt_length, data.overlong)"
        )
    if tokenizer.vocab_size > model_vocab:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but the actor's vocab_size is {model_vocab}"
        )
    return PromptSource(
        prompts, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size, tokenizer.info().to_dict()
    )


def iteration_prompts(
    source: PromptSource, iteration: int, batch: int, seed: int, dp_rank: int, dp_size: int
) -> tuple[list[list[int]], int]:
    """This DP rank's prompts of ``iteration`` (positions ``[it*B, (it+1)*B)`` of seeded epoch
    permutations) and the index of its first prompt within the iteration's batch."""
    from c2f_megatron.training.data_order import DataOrder

    order = DataOrder(len(source.prompts), seed)
    per_rank = batch // dp_size
    offset = dp_rank * per_rank
    return [source.prompts[i] for i in order.indices(iteration * batch + offset, per_rank)], offset


# ------------------------------------------------------------------------------------------------- models


def resolve_checkpoint(path: str, role: str) -> Path:
    """A c2f checkpoint dir; a training-checkpoint root resolves to its latest step (``role/`` inside a PPO
    step, when present)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{role}: checkpoint {p} not found")
    if not (p / METADATA_FILE).is_file() and not (p / TRAINER_STATE_FILE).is_file():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"{role}: {p} holds no c2f checkpoint and no complete step_* checkpoint")
        p = latest
    if (p / role.split(".")[0] / METADATA_FILE).is_file():
        p = p / role.split(".")[0]
    if not (p / METADATA_FILE).is_file():
        raise CheckpointError(f"{role}: {p} has no {METADATA_FILE}")
    return p


def _model_config(cfg: PPOJobConfig, ckpt: Path | None) -> ModelConfig:
    if ckpt is None:
        return cfg.model.resolve()
    runtime = {k: v for k, v in cfg.model.overrides.items() if k in cfg.model.RUNTIME_FIELDS}
    return dataclasses.replace(read_metadata(ckpt).model, **runtime)


def _build(kind: str, model_cfg: ModelConfig, ckpt: Path | None, layout: RoleLayout) -> list[torch.nn.Module]:
    """``layout.name``'s chunks, loaded from ``ckpt`` when given; a layout the model cannot take (e.g. TP not
    dividing the heads) is reported with the role's config section."""
    from c2f_megatron.training.trainer import build_chunks, load_initial_weights

    try:
        chunks = build_chunks(kind, model_cfg, layout)
    except ValueError as exc:
        section = "parallel" if layout.is_global else f"{layout.name}.parallel"
        raise ValueError(f"{section} ({layout.describe()}): {exc}") from exc
    if ckpt is not None:
        load_initial_weights(kind, chunks, ckpt)
    return chunks


@dataclass
class RoleLayouts:
    """Each PPO role's layout; the actor's is megatron's global one."""

    actor: RoleLayout
    critic: RoleLayout
    reference: RoleLayout
    reward: RoleLayout

    def describe(self) -> str:
        return "; ".join(x.describe() for x in (self.actor, self.critic, self.reference, self.reward))


def build_layouts(cfg: PPOJobConfig) -> RoleLayouts:
    """Collective (same order on every rank): the process groups of every role whose TP/PP differs from
    the actor's, after checking that the batch geometry splits over each role's data-parallel size."""
    actor = global_layout("actor")
    if actor.vpp is not None:
        raise ValueError(
            "parallel.virtual_pipeline_model_parallel_size: the PPO actor needs one model chunk per rank "
            "(the rollout's KV-cached decoding has no interleaved schedule); unset it"
        )
    critic = build_role_layout("critic", *cfg.critic.parallel.resolve(cfg.parallel))
    reference = build_role_layout("reference", *cfg.reference.parallel.resolve(cfg.parallel))
    reward = build_role_layout("reward", *cfg.reward.parallel.resolve(cfg.parallel))
    cfg.ppo.check_role("actor", actor.dp, trained=True)
    cfg.ppo.check_role("critic", critic.dp, trained=True)
    cfg.ppo.check_role("reference", reference.dp, trained=False)
    if cfg.reward.kind == "model":
        cfg.ppo.check_role("reward", reward.dp, trained=False)
    return RoleLayouts(actor, critic, reference, reward)


@dataclass
class Workers:
    actor: ActorWorker
    critic: CriticWorker
    reference: ReferenceWorker
    reward: RewardFunction
    actor_meta: CheckpointMetadata
    critic_meta: CheckpointMetadata
    source: PromptSource
    layouts: RoleLayouts


def build_workers(cfg: PPOJobConfig) -> Workers:
    """Actor (+ frozen reference with the same initial weights), critic, reward, and the prompt stream,
    each model on its role's layout."""
    layouts = build_layouts(cfg)
    actor_ckpt = resolve_checkpoint(cfg.actor.init_from, "actor.init_from") if cfg.actor.init_from else None
    actor_cfg = _model_config(cfg, actor_ckpt)
    source = load_prompts(cfg, actor_cfg.vocab_size)
    stops = [source.eos_id, *cfg.generation.extra_stop_ids]
    suppressed = stops if cfg.generation.suppress_eos else []
    mbs = cfg.ppo.micro_batch_size

    actor_chunks = _build("gpt", actor_cfg, actor_ckpt, layouts.actor)
    if layouts.reference.is_global:  # same layout: copy the actor's initial shards
        ref_chunks = _build("gpt", actor_cfg, None, layouts.reference)
        for ref, actor in zip(ref_chunks, actor_chunks):
            ref.load_state_dict(unwrap_model(actor).state_dict())
    elif actor_ckpt is None:
        raise ValueError(
            "reference.parallel differs from the actor's layout, so the reference loads the actor's "
            "initial weights from actor.init_from at its own TP/PP: set actor.init_from"
        )
    else:
        ref_chunks = _build("gpt", actor_cfg, actor_ckpt, layouts.reference)
    actor_tm = setup_training(actor_chunks, cfg.actor.optim, actor_cfg, cfg.ppo.iterations, layouts.actor)

    reward: RewardFunction
    rm_ckpt = None
    if cfg.reward.kind == "model":
        rm_ckpt = resolve_checkpoint(cfg.reward.path, "reward.path")
        rm_meta = read_metadata(rm_ckpt)
        if rm_meta.kind != "value":
            raise CheckpointError(
                f"reward.path {rm_ckpt}: field 'kind' is {rm_meta.kind!r}, expected 'value'"
            )
        _check_same_tokenizer(source, rm_meta, "reward.path")
        rm_chunks = _build("value", dataclasses.replace(rm_meta.model), rm_ckpt, layouts.reward)
        stats = rm_meta.extra.get("eval", {})
        mean, std = stats.get("reward_mean"), stats.get("reward_std")
        if cfg.reward.normalize and (mean is None or std is None):
            raise CheckpointError(
                f"reward.normalize is true but {rm_ckpt}/c2f_checkpoint.json has no extra.eval.reward_mean/"
                "reward_std (train the RM with an eval set, or set reward.normalize=false)"
            )
        if not cfg.reward.normalize:
            mean = std = None
        reward = RewardModelWorker(
            FrozenChunks(rm_chunks, layouts.reward, cfg.offload_frozen), mbs, mean, std
        )
    else:
        reward = TokenFrequencyReward(cfg.reward.target_token)

    critic_src = cfg.critic.init_from or (cfg.reward.path if cfg.reward.kind == "model" else None)
    critic_ckpt = resolve_checkpoint(critic_src, "critic.init_from") if critic_src else None
    critic_cfg = _model_config(cfg, critic_ckpt)
    if critic_ckpt is not None:
        _check_same_tokenizer(source, read_metadata(critic_ckpt), "critic.init_from")
    critic_tm = setup_training(
        _build("value", critic_cfg, critic_ckpt, layouts.critic),
        cfg.critic.optim,
        critic_cfg,
        cfg.ppo.iterations,
        layouts.critic,
    )

    temp = cfg.generation.temperature
    provenance = {"trainer": "coarse-actor", "actor_init": cfg.actor.init_from, "reward": str(rm_ckpt or "")}
    return Workers(
        actor=ActorWorker(actor_tm, source.vocab_size, suppressed, temp, mbs),
        critic=CriticWorker(critic_tm, mbs),
        reference=ReferenceWorker(
            FrozenChunks(ref_chunks, layouts.reference, cfg.offload_frozen),
            source.vocab_size,
            suppressed,
            temp,
            mbs,
        ),
        reward=reward,
        actor_meta=CheckpointMetadata(actor_cfg, source.tokenizer, "gpt", actor_cfg.params_dtype, provenance),
        critic_meta=CheckpointMetadata(
            critic_cfg, source.tokenizer, "value", critic_cfg.params_dtype, provenance
        ),
        source=source,
        layouts=layouts,
    )


def _check_same_tokenizer(source: PromptSource, meta: CheckpointMetadata, field: str) -> None:
    theirs = (meta.tokenizer or {}).get("vocab_size")
    if source.tokenizer and theirs is not None and theirs != source.vocab_size:
        raise CheckpointError(
            f"{field}: checkpoint tokenizer has {theirs} ids, the prompts' tokenizer {source.vocab_size}"
        )


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
):
    """Rollout of this rank's prompts (rows ``row_offset...`` of the iteration's batch), gathered over the
    actor's data-parallel ranks, then scoring by every role; returns the whole batch's experience (the same
    on every rank) and the time split."""
    gen = GenerationConfig(
        max_new_tokens=length,
        temperature=cfg.generation.temperature,
        top_k=cfg.generation.top_k,
        top_p=cfg.generation.top_p,
        suppress_ids=list(w.actor.suppressed),
        stop_ids=[] if cfg.generation.suppress_eos else [w.source.eos_id, *cfg.generation.extra_stop_ids],
        pad_id=w.source.pad_id,
        seed=cfg.ppo.seed * 1_000_003 + iteration,
    )
    t0 = time.perf_counter()
    local = Experience.from_rollout(w.actor.generate(prompts, gen, row_offset))
    exp = gather_experience(local, w.actor.layout, w.source.pad_id)
    t1 = time.perf_counter()
    exp.old_logprobs, exp.entropy = w.actor.compute_log_probs(exp)
    exp.ref_logprobs = w.reference.compute_log_probs(exp)
    exp.values = w.critic.compute_values(exp)
    exp.raw_scores = w.reward.score(exp)
    exp.scores = normalize_scores(exp.raw_scores, w.reward.mean, w.reward.std, cfg.reward.clip)
    t2 = time.perf_counter()
    ppo = cfg.ppo
    finalize(exp, kl_coef, ppo.kl_estimator, ppo.gamma, ppo.lam, ppo.whiten_advantages)
    t3 = time.perf_counter()
    return exp, {"time_rollout_s": t1 - t0, "time_scoring_s": t2 - t1, "time_gae_s": t3 - t2}


def ppo_update(w: Workers, cfg: PPOJobConfig, exp: Experience, iteration: int, update_actor: bool):
    """``ppo.epochs`` passes over shuffled minibatches of the whole batch (the same shuffle on every rank);
    one critic (and actor) optimizer step per minibatch, each role on its data-parallel slice of it."""
    mini_rows = cfg.ppo.mini_batch_size
    gen = torch.Generator().manual_seed(cfg.ppo.seed * 7_919 + iteration)
    actor_steps, critic_steps = [], []
    skipped = 0
    for _ in range(cfg.ppo.epochs):
        order = torch.randperm(len(exp), generator=gen)
        for start in range(0, len(exp), mini_rows):
            mini = exp.select(order[start : start + mini_rows].to(exp.tokens.device))
            c = w.critic.update(mini, cfg.ppo.value_clip)
            critic_steps.append({**c.metrics, "critic_grad_norm": c.grad_norm, "critic_lr": c.lr})
            skipped += int(c.skipped)
            if update_actor:
                a = w.actor.update(mini, cfg.ppo.clip_eps)
                actor_steps.append({**a.metrics, "actor_grad_norm": a.grad_norm, "actor_lr": a.lr})
                skipped += int(a.skipped)
    out = _average(critic_steps)
    out.update(_average(actor_steps))
    out["skipped_steps"] = float(skipped)
    return out


def run(cfg: PPOJobConfig, config_dump: dict[str, Any] | None = None) -> RunResult:
    """Train the coarse actor as configured. Call after ``init_distributed(cfg.parallel)``."""
    w = build_workers(cfg)
    dp_size, dp_rank = w.actor.layout.dp, w.actor.layout.dp_rank
    kl_ctl = build_kl_controller(cfg.kl)
    length_ctl = build_length_controller(cfg.length)
    models = [
        ModelState(
            w.actor.tm.chunks,
            w.actor_meta,
            w.actor.tm.optimizer if cfg.checkpoint.save_optimizer else None,
            ACTOR,
        ),
        ModelState(
            w.critic.tm.chunks,
            w.critic_meta,
            w.critic.tm.optimizer if cfg.checkpoint.save_optimizer else None,
            CRITIC,
        ),
    ]
    ck = cfg.checkpoint
    state = TrainerState()
    resume_dir = latest_checkpoint(ck.dir) if (ck.dir and ck.resume) else None
    if resume_dir is not None:
        state = load_training_checkpoint(resume_dir, models, load_optimizer=ck.save_optimizer)
        extra = state.extra
        w.actor.tm.scheduler.load_state_dict(extra["actor_scheduler"])
        w.critic.tm.scheduler.load_state_dict(extra["critic_scheduler"])
        kl_ctl.load_state_dict(extra["kl_controller"])
        length_ctl.load_state_dict(extra["length_controller"])

    log = MetricsLogger(cfg.logging, cfg.ppo.iterations, config_dump, start_step=state.step)
    if resume_dir is not None:
        log.message(f"resumed from {resume_dir} at iteration {state.step}")
    log.message(
        f"coarse-actor: {len(w.source.prompts)} prompts, {cfg.ppo.rollout_batch_size} per iteration; "
        f"{w.layouts.describe()}; reward {cfg.reward.kind}, length limit {length_ctl.length}"
    )

    def save() -> Path | None:
        if not ck.dir:
            return None
        state.extra = {
            "actor_scheduler": w.actor.tm.scheduler.state_dict(),
            "critic_scheduler": w.critic.tm.scheduler.state_dict(),
            "kl_controller": kl_ctl.state_dict(),
            "length_controller": length_ctl.state_dict(),
            "prompt_position": state.consumed_samples,
        }
        path = save_training_checkpoint(ck.dir, models, state, keep_last=ck.keep_last)
        log.message(f"saved {path}")
        return path

    history: list[dict[str, Any]] = []
    last_saved = resume_dir
    preempt = PreemptionHandler.from_env()  # SIGUSR1/SIGTERM or $C2F_PREEMPT_REQUEST: save and stop
    try:
        while state.step < cfg.ppo.iterations:
            it = state.step
            t0 = time.perf_counter()
            prompts, row_offset = iteration_prompts(
                w.source, it, cfg.ppo.rollout_batch_size, cfg.ppo.seed, dp_rank, dp_size
            )
            length = length_ctl.length
            kl_coef = kl_ctl.value
            exp, times = make_experience(w, cfg, prompts, row_offset, length, it, kl_coef)
            record: dict[str, Any] = experience_metrics(exp)
            t1 = time.perf_counter()
            update_actor = it >= cfg.ppo.critic_warmup_iterations
            record.update(ppo_update(w, cfg, exp, it, update_actor))
            times["time_training_s"] = time.perf_counter() - t1
            kl_ctl.update(record["kl_per_seq"], cfg.ppo.rollout_batch_size)
            decision = length_ctl.update(record["reward_mean"], record["vf_loss"])
            state.step += 1
            state.consumed_samples += cfg.ppo.rollout_batch_size
            seconds = time.perf_counter() - t0
            tokens = float(exp.tokens.numel())  # the whole batch (every rank holds it)
            record.update(times)
            record.update(
                kl_coef=kl_coef,
                rollout_length_limit=float(length),  # the limit this iteration was rolled out at
                cm_input_reward=record["reward_mean"],
                cm_input_critic_loss=record["vf_loss"],
                actor_updated=float(update_actor),
                iteration_time_s=seconds,
                tokens_per_s=tokens / max(seconds, 1e-9),
            )
            record.update(decision.metrics())  # length_limit: the limit for the next iteration
            history.append(record)
            log.log(state.step, record)
            done = state.step >= cfg.ppo.iterations
            exit_now = ck.exit_after_iterations is not None and state.step >= ck.exit_after_iterations
            saved_now = bool(ck.save_interval and state.step % ck.save_interval == 0) or done or exit_now
            if saved_now:
                last_saved = save()
            if exit_now and not done:
                log.message(
                    f"exit_after_iterations={ck.exit_after_iterations}: stopping at iteration {state.step}"
                )
                break
            if not done and preempt.should_stop():
                last_saved = last_saved if saved_now else save()
                preempt.mark_preempted(state.step, last_saved)
                log.message(
                    f"preempted ({preempt.reason()}): checkpointed and stopping at iteration {state.step}"
                )
                break
    finally:
        preempt.uninstall()
        log.close()
    return RunResult(state.step, history, last_saved)
