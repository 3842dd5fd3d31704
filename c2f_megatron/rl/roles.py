"""The four PPO roles of a job, each an ``engine.RoleModel`` on its own layout, wrapped in its worker.

- actor: the policy (``actor.init_from``, or ``model`` from scratch), trained; its layout is ``parallel``
  (megatron's global one);
- reference: the actor's initial weights, frozen (copied shard by shard on the actor's layout, loaded
  from ``actor.init_from`` at its own TP/PP otherwise);
- critic: ``critic.init_from``, else the reward model (``reward.path``), else ``model``; a ``gpt``
  checkpoint gives it the LM's backbone and a fresh head; trained;
- reward: a frozen value model (``reward.kind: model``) or a programmatic reward.

Every role's process groups are built first, in the same order on every rank (collective), after the batch
geometry is checked against each role's data-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from c2f_megatron.checkpoint.megatron_dir import CheckpointError, CheckpointMetadata, read_metadata
from c2f_megatron.checkpoint.resolve import check_tokenizer, resolve_checkpoint
from c2f_megatron.config import ConfigError
from c2f_megatron.engine.role_model import RoleModel
from c2f_megatron.models.config import RUNTIME_FIELDS
from c2f_megatron.platform.role_layout import RoleLayout, build_role_layout, global_layout
from c2f_megatron.rl.config import PPOJobConfig
from c2f_megatron.rl.prompts import PromptSource, load_prompts
from c2f_megatron.rl.workers import (
    ActorWorker,
    CriticWorker,
    ReferenceWorker,
    RewardFunction,
    RewardModelWorker,
    TokenFrequencyReward,
)


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


def _role(
    cfg: PPOJobConfig, name: str, kind: str, ckpt: Path | None, layout: RoleLayout, trained: bool
) -> RoleModel:
    """A role from its checkpoint (the run-time fields of ``model.overrides`` applied) or, without one,
    from ``model``."""
    optim = getattr(cfg, name).optim if trained else None
    offload = cfg.offload_frozen and not trained
    overrides = cfg.parallel.activation_overrides(layout.tp) if trained else None
    common = dict(optim=optim, train_steps=cfg.ppo.iterations, offload=offload, config_overrides=overrides)
    if ckpt is None:
        return RoleModel.build(name, kind, cfg.model.resolve(), layout, **common)
    runtime = {k: v for k, v in cfg.model.overrides.items() if k in RUNTIME_FIELDS}
    return RoleModel.from_checkpoint(name, kind, ckpt, layout, runtime=runtime, **common)


def _resolve(path: str | None, role: str, field: str, tokenizer: dict | None) -> Path | None:
    if not path:
        return None
    ckpt = resolve_checkpoint(path, role, field)
    check_tokenizer(tokenizer, read_metadata(ckpt), field)
    return ckpt


def _packs(wanted: bool, role: RoleModel) -> bool:
    """Padding-free micro-batches for ``role`` when asked for and its layout allows them: one pipeline
    stage (stages exchange activations of one fixed sequence length) and the sdpa spec, whose attention
    takes megatron's THD ``PackedSeqParams`` (megatron's local attention refuses them; TE takes them, but
    that path has not run here yet)."""
    from c2f_megatron.models.specs import resolve_layer_spec

    return wanted and role.layout.pp == 1 and resolve_layer_spec(role.model_cfg.layer_spec) == "sdpa"


def build_workers(cfg: PPOJobConfig) -> Workers:
    """Every role on its layout, in its worker, and the prompt stream."""
    if cfg.reward.kind == "model" and not cfg.reward.path:
        raise ConfigError("reward.path is required when reward.kind is 'model' (or set reward.kind)")
    layouts = build_layouts(cfg)
    actor_ckpt = (
        resolve_checkpoint(cfg.actor.init_from, "actor", "actor.init_from") if cfg.actor.init_from else None
    )
    actor_cfg = read_metadata(actor_ckpt).model if actor_ckpt else cfg.model.resolve()
    source = load_prompts(cfg, actor_cfg.vocab_size)
    actor_meta = read_metadata(actor_ckpt) if actor_ckpt else CheckpointMetadata(actor_cfg)
    check_tokenizer(source.tokenizer, actor_meta, "actor.init_from" if actor_ckpt else "model")
    stops = [source.eos_id, *cfg.generation.extra_stop_ids]
    suppressed = stops if cfg.generation.suppress_eos else []
    mbs, temp = cfg.ppo.micro_batch_size, cfg.generation.temperature
    packs = partial(_packs, cfg.ppo.pack_sequences)

    actor = _role(cfg, "actor", "gpt", actor_ckpt, layouts.actor, trained=True)
    if layouts.reference.is_global:  # same layout: copy the actor's initial shards
        reference = RoleModel.build(
            "reference",
            "gpt",
            actor.model_cfg,
            layouts.reference,
            initialize=False,
            offload=cfg.offload_frozen,
        )
        reference.copy_weights_from(actor)
    elif actor_ckpt is None:
        raise ValueError(
            "reference.parallel differs from the actor's layout, so the reference loads the actor's "
            "initial weights from actor.init_from at its own TP/PP: set actor.init_from"
        )
    else:
        reference = _role(cfg, "reference", "gpt", actor_ckpt, layouts.reference, trained=False)

    reward: RewardFunction
    rm_ckpt = None
    if cfg.reward.kind == "model":
        rm_ckpt = _resolve(cfg.reward.path, "reward", "reward.path", source.tokenizer)
        rm_meta = read_metadata(rm_ckpt)
        if rm_meta.kind != "value":
            raise CheckpointError(
                f"reward.path {rm_ckpt}: field 'kind' is {rm_meta.kind!r}, expected 'value'"
            )
        stats = rm_meta.extra.get("eval", {})
        mean, std = stats.get("reward_mean"), stats.get("reward_std")
        if cfg.reward.normalize and (mean is None or std is None):
            raise CheckpointError(
                f"reward.normalize is true but {rm_ckpt}/c2f_checkpoint.json has no extra.eval.reward_mean/"
                "reward_std (train the RM with an eval set, or set reward.normalize=false)"
            )
        if not cfg.reward.normalize:
            mean = std = None
        rm = RoleModel.from_checkpoint("reward", "value", rm_ckpt, layouts.reward, offload=cfg.offload_frozen)
        reward = RewardModelWorker(rm, mbs, mean, std, packs(rm))
    else:
        reward = TokenFrequencyReward(cfg.reward.target_token)

    critic_src = cfg.critic.init_from or (cfg.reward.path if cfg.reward.kind == "model" else None)
    critic_ckpt = _resolve(critic_src, "critic", "critic.init_from", source.tokenizer)
    critic = _role(cfg, "critic", "value", critic_ckpt, layouts.critic, trained=True)

    provenance = {"trainer": "coarse-actor", "actor_init": cfg.actor.init_from, "reward": str(rm_ckpt or "")}
    return Workers(
        actor=ActorWorker(actor, source.vocab_size, suppressed, temp, mbs, packs(actor)),
        critic=CriticWorker(critic, mbs, packs(critic)),
        reference=ReferenceWorker(reference, source.vocab_size, suppressed, temp, mbs, packs(reference)),
        reward=reward,
        actor_meta=actor.metadata(source.tokenizer, provenance),
        critic_meta=critic.metadata(source.tokenizer, provenance),
        source=source,
        layouts=layouts,
    )
