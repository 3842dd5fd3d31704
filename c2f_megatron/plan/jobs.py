"""From a job YAML to the roles ``c2f plan`` sizes: each model, its layout, whether it trains, and the
batch geometry of each phase.

Trainer configs (``train-lm``, ``train-sft``, ``train-rm``) have one trained role. A PPO config
(``coarse-actor``) has four colocated roles: actor and critic trained, reference and reward model frozen.
A pipeline config is planned stage by stage with the architecture of its base model. A role's
architecture is its checkpoint's own when the checkpoint exists, else ``model.preset`` (with
``model.overrides``), as a run from scratch would build it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from c2f_megatron.config import ConfigError, from_dict, load_config
from c2f_megatron.engine.config import OptimConfig
from c2f_megatron.models.config import ModelConfig, get_preset
from c2f_megatron.platform.distributed import ParallelConfig

TRAINERS = {
    "train-lm": ("c2f_megatron.training.tasks.lm", "LMJobConfig", 1),
    "train-sft": ("c2f_megatron.training.tasks.sft", "SFTJobConfig", 1),
    "train-rm": ("c2f_megatron.training.tasks.reward", "RMJobConfig", 2),  # a pair is two sequences
}


@dataclass
class RolePlan:
    """One model of a job on its layout, and the shapes its phases run at."""

    name: str
    kind: str  # gpt | value
    model: ModelConfig
    architecture_from: str  # where the architecture came from (a checkpoint, or model.preset)
    tp: int
    pp: int
    dp: int
    vpp: int | None
    optim: OptimConfig | None  # None: frozen
    activations: ParallelConfig  # sequence_parallel / recompute (trained roles)
    micro_batch: int  # sequences per micro-batch
    seq: int  # tokens per sequence in training / scoring
    micro_batches: int  # per optimizer step per rank (pipeline fill)
    explicit_mask: bool  # padded rows with an attention mask (PPO) rather than plain causal
    offloaded: bool = False  # frozen and kept on the CPU between uses

    @property
    def trained(self) -> bool:
        return self.optim is not None

    def overrides(self) -> dict[str, Any]:
        return self.activations.activation_overrides(self.tp) if self.trained else {}


@dataclass
class Rollout:
    """The actor's generation: prompts per data-parallel rank and the KV cache length."""

    batch_per_rank: int
    prompt_tokens: int
    new_tokens: int


@dataclass
class JobPlan:
    title: str  # "<command> <config>"
    command: str
    world: int
    roles: list[RolePlan]
    rollout: Rollout | None = None


def detect_command(data: dict[str, Any]) -> str:
    """The ``c2f`` command a job YAML is for, from its sections."""
    if {"coarse", "rm", "base"} & set(data) and "run_dir" in data:
        return "pipeline"
    if {"ppo", "actor", "critic"} & set(data):
        return "coarse-actor"
    if "reward" in data:
        return "train-rm"
    if "paths" in (data.get("data") or {}):
        return "train-lm"
    return "train-sft"


def _architecture(
    model_section: Any, path: str | None, field: str, fallback: ModelConfig | None
) -> tuple[ModelConfig, str]:
    """A role's ``ModelConfig``: its checkpoint's when ``path`` holds one, else ``fallback`` (a pipeline's
    base), else ``model.preset``."""
    from c2f_megatron.checkpoint.megatron_dir import read_metadata
    from c2f_megatron.checkpoint.resolve import resolve_checkpoint

    if path and Path(path).is_dir():
        ckpt = resolve_checkpoint(path, field=field)
        return model_section.resolve(from_checkpoint=read_metadata(ckpt).model), str(ckpt)
    if fallback is not None:  # the stage starts from the base's checkpoint: its run-time overrides apply
        return model_section.resolve(from_checkpoint=fallback), "the pipeline's base model"
    if model_section.preset is not None:
        where = f"model.preset {model_section.preset}"
        return model_section.resolve(), where + (f" ({field} {path} does not exist yet)" if path else "")
    if path:
        raise ConfigError(
            f"{field} {path} does not exist and model.preset is not set: set model.preset=NAME to plan the "
            "job before its checkpoint exists"
        )
    return model_section.resolve(), "model.overrides"


def _trainer_plan(command: str, cfg: Any, world: int | None, fallback: ModelConfig | None) -> JobPlan:
    seqs = TRAINERS[command][2]
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    world = world or tp * pp
    _check_world(world, [("parallel", tp, pp)])
    dp = world // (tp * pp)
    model, where = _architecture(cfg.model, cfg.checkpoint.init_from, "checkpoint.init_from", fallback)
    kind = "value" if command == "train-rm" else "gpt"
    role = RolePlan(
        name="reward model" if kind == "value" else "model",
        kind=kind,
        model=model,
        architecture_from=where,
        tp=tp,
        pp=pp,
        dp=dp,
        vpp=par.virtual_pipeline_model_parallel_size,
        optim=cfg.optim,
        activations=par,
        micro_batch=cfg.train.micro_batch_size * seqs,
        seq=cfg.train.seq_length,
        micro_batches=cfg.train.num_microbatches(dp),
        explicit_mask=False,
    )
    return JobPlan(command, command, world, [role])


def _ppo_plan(cfg: Any, world: int | None, fallback: ModelConfig | None) -> JobPlan:
    par = cfg.parallel
    layouts = {
        "actor": (par.tensor_model_parallel_size, par.pipeline_model_parallel_size),
        "critic": cfg.critic.parallel.resolve(par),
        "reference": cfg.reference.parallel.resolve(par),
        "reward": cfg.reward.parallel.resolve(par),
    }
    if cfg.reward.kind != "model":
        del layouts["reward"]
    world = world or math.lcm(*(tp * pp for tp, pp in layouts.values()))
    _check_world(
        world, [("parallel" if n == "actor" else f"{n}.parallel", tp, pp) for n, (tp, pp) in layouts.items()]
    )
    actor_model, actor_where = _architecture(cfg.model, cfg.actor.init_from, "actor.init_from", fallback)
    critic_src = cfg.critic.init_from or (cfg.reward.path if cfg.reward.kind == "model" else None)
    length = cfg.length
    new = length.fixed_length if length.kind == "fixed" else length.cm.max_length
    seq = cfg.data.max_prompt_length + new
    mbs = cfg.ppo.micro_batch_size
    roles = []
    for name, (tp, pp) in layouts.items():
        dp = world // (tp * pp)
        trained = name in ("actor", "critic")
        if name in ("actor", "reference"):
            model, where = actor_model, actor_where
        else:
            field = "critic.init_from" if name == "critic" and cfg.critic.init_from else "reward.path"
            model, where = _architecture(
                cfg.model, critic_src if name == "critic" else cfg.reward.path, field, fallback
            )
        cfg.ppo.check_role(name, dp, trained)
        roles.append(
            RolePlan(
                name=name,
                kind="gpt" if name in ("actor", "reference") else "value",
                model=model,
                architecture_from=where,
                tp=tp,
                pp=pp,
                dp=dp,
                vpp=par.virtual_pipeline_model_parallel_size if (tp, pp) == layouts["actor"] else None,
                optim=getattr(cfg, name).optim if trained else None,
                activations=par,
                micro_batch=mbs,
                seq=seq,
                micro_batches=cfg.ppo.mini_batch_size // (dp * mbs) if trained else 1,
                explicit_mask=True,
                offloaded=cfg.offload_frozen and not trained,
            )
        )
    actor_dp = roles[0].dp
    rollout = Rollout(cfg.ppo.rollout_batch_size // actor_dp, cfg.data.max_prompt_length, new)
    return JobPlan("coarse-actor", "coarse-actor", world, roles, rollout)


def _check_world(world: int, layouts: list[tuple[str, int, int]]) -> None:
    for section, tp, pp in layouts:
        if world % (tp * pp):
            raise ConfigError(
                f"--gpus {world} is not a multiple of {section}: tensor_model_parallel_size {tp} x "
                f"pipeline_model_parallel_size {pp}"
            )


def _job_class(command: str) -> type:
    import importlib

    if command == "coarse-actor":
        from c2f_megatron.rl.config import PPOJobConfig

        return PPOJobConfig
    module, cls, _ = TRAINERS[command]
    return getattr(importlib.import_module(module), cls)


def _job_plan(command: str, cfg: Any, world: int | None, fallback: ModelConfig | None) -> JobPlan:
    if command == "coarse-actor":
        return _ppo_plan(cfg, world, fallback)
    return _trainer_plan(command, cfg, world, fallback)


def plan_jobs(
    path: str, overrides: list[str], world: int | None = None, command: str | None = None
) -> list[JobPlan]:
    """The jobs of a YAML: one, or a pipeline's training stages (``world``: GPUs; default the smallest
    the layouts allow, or a pipeline stage's ``nproc``)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".splitlines()[0]) from None
    command = command or detect_command(data)
    if command != "pipeline":
        plan = _job_plan(command, load_config(_job_class(command), path, overrides), world, None)
        plan.title = f"{command} {path}"
        return [plan]
    return _pipeline_plans(path, overrides, world)


def _pipeline_plans(path: str, overrides: list[str], world: int | None) -> list[JobPlan]:
    """Each training stage of a pipeline as the pipeline writes its job (placeholder paths)."""
    from c2f_megatron.checkpoint.resolve import PACKAGED_SMOLLM2
    from c2f_megatron.pipeline.config import PipelineConfig
    from c2f_megatron.pipeline.stages import Pipeline

    cfg = load_config(PipelineConfig, path, overrides)
    pipe = Pipeline(cfg)
    base = None
    if cfg.base.pretrained == PACKAGED_SMOLLM2:
        base = get_preset("smollm2-135m", **({"params_dtype": cfg.base.dtype} if cfg.base.dtype else {}))
    elif cfg.base.pretrained is not None:
        hf = Path(cfg.base.pretrained) / "config.json"
        if not hf.is_file():
            raise ConfigError(f"{path}: base.pretrained {cfg.base.pretrained}: no config.json to plan from")
        import json

        from c2f_megatron.checkpoint.hf_mapping import model_config_from_hf

        base = model_config_from_hf(json.loads(hf.read_text()), str(hf), cfg.base.dtype)
    stages: list[tuple[str, str, dict[str, Any], int]] = []
    placeholder = Path(cfg.run_dir) / "planned"
    if cfg.base.pretrained is None:
        stages.append(("base", "train-lm", pipe.base_job(), cfg.base.nproc))
    if cfg.sft.enabled:
        stages.append(("sft", "train-sft", pipe.sft_job(placeholder), cfg.sft.nproc))
    stages.append(("rm", "train-rm", pipe.rm_job(placeholder), cfg.rm.nproc))
    stages.append(
        ("coarse", "coarse-actor", pipe.ppo_job("coarse", placeholder, placeholder), cfg.coarse.nproc)
    )
    for v in cfg.variants:
        stages.append((v.name, "coarse-actor", pipe.ppo_job(v.name, placeholder, placeholder, v), v.nproc))
    plans = []
    for name, command, job, nproc in stages:
        job_cfg = from_dict(_job_class(command), job, where=f"{path}: {name}.job")
        if base is None:  # a from-scratch base: its own preset, which later stages inherit
            base = job_cfg.model.resolve()
        plan = _job_plan(command, job_cfg, world or nproc, base)
        plan.title = f"{command} {path} (stage {name})"
        plans.append(plan)
    return plans
