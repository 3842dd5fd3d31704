"""Typed job configuration of ``c2f coarse-actor``: one YAML, ``key.path=value`` overrides, errors naming the field.

Sections: ``model`` (architecture for roles built from scratch: tests, benchmarks), ``parallel`` (the actor's
TP/PP: megatron's global layout, which the rollout uses), ``actor`` / ``critic`` (init checkpoint + optimizer;
paper lrs 5e-6 / 5e-7), ``reference``, ``reward`` (reward model or a programmatic reward, normalisation,
clip), ``ppo`` (batch geometry, epochs, clipping, GAE), ``kl`` (controller + estimator), ``length`` (Continuous
Maximization), ``generation`` (sampling), ``data`` (prompt stream), ``checkpoint``, ``logging``,
``samples`` (decoded rollouts).

Every role lives on all ranks; ``critic.parallel``, ``reference.parallel`` and ``reward.parallel`` give a role
its own TP/PP (unset: the actor's), its data-parallel size being what is left of the world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from c2f_megatron.data.hh_rlhf import HHDataConfig
from c2f_megatron.data.templates import COARSE_ACTOR_SYSTEM_PROMPT
from c2f_megatron.engine.config import OptimConfig
from c2f_megatron.platform.distributed import ParallelConfig
from c2f_megatron.rl.kl_control import KLControlConfig
from c2f_megatron.rl.length_control import LengthControlConfig
from c2f_megatron.training.config import LoggingConfig, ModelSection


@dataclass
class RoleParallel:
    """A role's own tensor/pipeline parallel sizes; null fields take the actor's (``parallel``)."""

    tensor_model_parallel_size: int | None = None
    pipeline_model_parallel_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {getattr(self, name)}")

    def resolve(self, actor: ParallelConfig) -> tuple[int, int]:
        """(TP, PP) of the role."""
        return (
            self.tensor_model_parallel_size or actor.tensor_model_parallel_size,
            self.pipeline_model_parallel_size or actor.pipeline_model_parallel_size,
        )


def _actor_optim() -> OptimConfig:
    return OptimConfig(lr=5e-6, min_lr=5e-6, decay_style="constant", clip_grad=1.0)


def _critic_optim() -> OptimConfig:
    return OptimConfig(lr=5e-7, min_lr=5e-7, decay_style="constant", clip_grad=1.0)


@dataclass
class ActorConfig:
    """The policy. ``init_from``: the base model as a c2f ``gpt`` checkpoint (or a checkpoint root: its latest
    step, ``actor/`` inside a PPO step is used); null builds ``model`` from scratch (tests). The frozen
    reference starts from the same weights."""

    init_from: str | None = None
    optim: OptimConfig = field(default_factory=_actor_optim)


@dataclass
class CriticConfig:
    """The value model. ``init_from``: a ``value`` checkpoint (the reward model, the usual choice) or a ``gpt``
    checkpoint (the base model: backbone loaded, fresh head); null: ``reward.path`` when the reward is a model,
    else ``model`` from scratch."""

    init_from: str | None = None
    optim: OptimConfig = field(default_factory=_critic_optim)
    parallel: RoleParallel = field(default_factory=RoleParallel)


@dataclass
class ReferenceConfig:
    """The frozen reference policy (the actor's initial weights) on its own layout."""

    parallel: RoleParallel = field(default_factory=RoleParallel)


@dataclass
class RewardSection:
    """``model``: a frozen value checkpoint (``path``) read at the last generated token. ``token_frequency``:
    the fraction of response tokens equal to ``target_token`` (a programmatic reward for tests/sanity runs).

    ``normalize``: ``(score - mean) / std`` with the reward model's eval statistics (checkpoint metadata
    ``extra.eval.reward_mean/std``); ``clip``: scores clipped to ``[-clip, clip]`` after that (null: off).
    """

    kind: Literal["model", "token_frequency"] = "model"
    path: str | None = None
    normalize: bool = True
    clip: float | None = 5.0
    target_token: int = 0
    parallel: RoleParallel = field(default_factory=RoleParallel)

    def __post_init__(self) -> None:
        # ``path`` is checked when the roles are built: a config may name it in an override later
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"reward.clip must be > 0 or null, got {self.clip}")
        if self.target_token < 0:
            raise ValueError(f"reward.target_token must be >= 0, got {self.target_token}")


@dataclass
class PPOConfig:
    """Batch geometry in sequences: ``rollout_batch_size`` prompts per iteration and ``mini_batch_size`` rows
    per optimizer step (both over all data-parallel ranks), ``micro_batch_size`` rows per forward per rank.
    Responses cut at the length limit are trained on (GAE treats the cut as the end of the episode).

    ``pack_sequences``: scoring and updates run on rows packed without their padding (verl's
    remove-padding, megatron's THD ``PackedSeqParams``), micro-batches of at most the tokens
    ``micro_batch_size`` padded rows would hold, on every role whose layout has one pipeline stage and the
    sdpa spec (the others stay padded)."""

    iterations: int = 100
    rollout_batch_size: int = 64
    mini_batch_size: int = 16
    micro_batch_size: int = 4
    epochs: int = 2
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    gamma: float = 0.95  # the paper's discount
    lam: float = 0.95
    whiten_advantages: bool = True
    critic_warmup_iterations: int = 0  # iterations that update only the critic
    kl_estimator: Literal["k1", "k3"] = "k3"
    seed: int = 0  # rollout sampling, minibatch shuffling and prompt order
    max_consecutive_nonfinite: int = 3  # iterations in a row with a skipped (non-finite) update: stop
    pack_sequences: bool = True

    def __post_init__(self) -> None:
        for name in (
            "iterations", "rollout_batch_size", "mini_batch_size", "micro_batch_size", "epochs",
            "max_consecutive_nonfinite",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"ppo.rollout_batch_size {self.rollout_batch_size} is not a multiple of ppo.mini_batch_size "
                f"{self.mini_batch_size}"
            )
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"ppo.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ValueError(f"ppo.value_clip must be > 0 or null, got {self.value_clip}")
        if self.critic_warmup_iterations < 0:
            raise ValueError(
                f"ppo.critic_warmup_iterations must be >= 0, got {self.critic_warmup_iterations}"
            )
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")

    def check_role(self, role: str, dp_size: int, trained: bool) -> None:
        """A role at data-parallel size ``dp_size`` splits the rollout batch (and, when ``trained``, every
        minibatch) into whole micro-batches per rank."""
        names = ("rollout_batch_size", "mini_batch_size") if trained else ("rollout_batch_size",)
        for name in names:
            rows = getattr(self, name)
            if rows % (dp_size * self.micro_batch_size):
                raise ValueError(
                    f"ppo.{name} {rows} must be a multiple of {role} DP size {dp_size} x "
                    f"ppo.micro_batch_size {self.micro_batch_size}"
                )


@dataclass
class GenerationSection:
    """Sampling for rollouts. Coarse mode (``suppress_eos: true``, the Coarse Actor): EOS and
    ``extra_stop_ids`` are suppressed (never sampled), so every response runs to the length controller's
    limit. ``suppress_eos: false`` is ordinary PPO (the paper's Plus baseline): sampling EOS or a stop id ends
    a response, which includes it. ``max_new_tokens`` comes from ``length`` each iteration.
    ``cuda_graph``: GPU rollouts replay each decode step from a CUDA graph (the actor on one pipeline
    stage)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    suppress_eos: bool = True
    extra_stop_ids: list[int] = field(default_factory=list)
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"generation.top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if any(i < 0 for i in self.extra_stop_ids):
            raise ValueError(f"generation.extra_stop_ids must be token ids >= 0, got {self.extra_stop_ids}")


@dataclass
class SyntheticPrompts:
    """Random token-id prompts (tests, benchmarks): ids in ``[low, vocab)``, lengths in ``[min_len, max_len]``."""

    num_prompts: int = 256
    min_len: int = 4
    max_len: int = 8
    low: int = 3

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.low < 0 or not 1 <= self.min_len <= self.max_len:
            raise ValueError(
                "need num_prompts >= 1, low >= 0 and 1 <= min_len <= max_len, got "
                f"{self.num_prompts}, {self.low}, {self.min_len}, {self.max_len}"
            )


@dataclass
class PromptDataConfig:
    """The prompt stream: ``hh`` (HH-RLHF prompts with the coarse-actor system prompt) or ``synthetic``.

    Prompts longer than ``max_prompt_length`` tokens keep their last ``max_prompt_length`` tokens
    (``overlong: truncate``) or are left out (``drop``: a chat template's system turn stays intact).
    """

    source: Literal["hh", "synthetic"] = "hh"
    hh: HHDataConfig = field(default_factory=HHDataConfig)
    tokenizer: str | None = None  # load_tokenizer spec; None = Mistral v0.1 sentencepiece
    system_prompt: str | None = COARSE_ACTOR_SYSTEM_PROMPT
    max_prompt_length: int = 256
    overlong: Literal["truncate", "drop"] = "truncate"
    synthetic: SyntheticPrompts = field(default_factory=SyntheticPrompts)

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}")


@dataclass
class SampleLogConfig:
    """Decoded rollouts beside ``metrics.jsonl`` (``samples.jsonl``) and, when wandb is on, as a wandb Table
    ``samples``: the batch's first ``rows`` rows at the first, the last and every ``every``-th iteration."""

    every: int = 1  # iterations between two samples
    rows: int = 1  # rows of the batch per sample (0: none)

    def __post_init__(self) -> None:
        if self.every < 1 or self.rows < 0:
            raise ValueError(f"samples.every must be >= 1 and rows >= 0, got {self.every}, {self.rows}")


@dataclass
class PPOCheckpointConfig:
    """``dir``: step checkpoints (actor + critic + optimizers + controllers + RNGs); a run resumes from the
    latest complete one there. ``exit_after_iterations``: save and stop there (preemption drills)."""

    dir: str | None = None
    resume: bool = True
    save_interval: int = 0  # 0: only at the end
    keep_last: int = 2
    save_optimizer: bool = True
    exit_after_iterations: int | None = None

    def __post_init__(self) -> None:
        if self.save_interval < 0:
            raise ValueError(
                f"checkpoint.save_interval must be >= 0 (0: only at the end), got {self.save_interval}"
            )
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if self.exit_after_iterations is not None and self.exit_after_iterations < 1:
            raise ValueError(
                f"checkpoint.exit_after_iterations must be >= 1 or null, got {self.exit_after_iterations}"
            )


@dataclass
class PPOJobConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    reward: RewardSection = field(default_factory=RewardSection)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    kl: KLControlConfig = field(default_factory=KLControlConfig)
    length: LengthControlConfig = field(default_factory=LengthControlConfig)
    generation: GenerationSection = field(default_factory=GenerationSection)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    checkpoint: PPOCheckpointConfig = field(default_factory=PPOCheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    samples: SampleLogConfig = field(default_factory=SampleLogConfig)
    offload_frozen: bool = False  # move the reference and reward model to CPU between uses (GPU only)

    def __post_init__(self) -> None:
        # LengthControlConfig checks its cm section; the ablations' own fields are checked here, at load
        if self.length.kind == "fixed" and self.length.fixed_length < 1:
            raise ValueError(f"length.fixed_length must be >= 1, got {self.length.fixed_length}")
        if self.length.kind == "step" and self.length.every < 1:
            raise ValueError(f"length.every must be >= 1, got {self.length.every}")
