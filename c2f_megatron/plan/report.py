"""Per-GPU memory of every role and of each phase of a job, the table ``c2f plan`` prints, and the knobs
that would make a job fit.

Weights, gradients and optimizer state are exact: the bytes megatron allocates for the real shards
(``plan.shards``). Activations, the KV cache and working buffers come from ``plan.memory``'s inventory.
Roles share the GPUs: a phase's figure adds every role's worst rank (exact when the roles' worst ranks
coincide, an upper bound otherwise) and counts what is resident all the time (trained roles' weights,
gradients and optimizer state; frozen roles unless offloaded) plus the phase's own working memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from c2f_megatron.models.config import DTYPE_ITEMSIZE
from c2f_megatron.models.specs import resolve_layer_spec
from c2f_megatron.plan import memory
from c2f_megatron.plan.jobs import JobPlan, RolePlan
from c2f_megatron.plan.shards import RoleShards, role_shards

ACTIVATION_CHOICES = (
    ("no recompute", None, False),
    ("selective recompute", "selective", False),
    ("full recompute", "full", False),
    ("sequence parallel", None, True),
    ("selective + sequence parallel", "selective", True),
    ("full + sequence parallel", "full", True),
)


@dataclass
class RoleMemory:
    """One role's per-GPU bytes (the worst rank)."""

    plan: RolePlan
    shards: RoleShards
    spec: str
    weights: int
    grads: int
    optimizer: int
    other_optimizer: int | None  # with the distributed optimizer flipped (trained roles, DP > 1)
    train_activations: float  # at the configured recompute / sequence parallelism
    activation_choices: dict[str, float] = field(default_factory=dict)
    forward_working: float = 0.0  # one micro-batch forward without gradients (scoring, eval)
    kv_cache: float = 0.0
    prefill_working: float = 0.0

    @property
    def resident(self) -> float:
        if self.plan.trained:
            return self.weights + self.grads + self.optimizer
        return 0 if self.plan.offloaded else self.weights


def layer_shape(role: RolePlan, spec: str) -> memory.LayerShape:
    m = role.model
    return memory.LayerShape(
        hidden=m.hidden_size,
        heads=m.num_attention_heads,
        kv_heads=m.num_query_groups,
        head_dim=m.head_dim,
        ffn=m.ffn_hidden_size,
        attention="unfused" if spec == "local" else "flash",
        attention_dropout=m.attention_dropout > 0,
        hidden_dropout=m.hidden_dropout > 0,
        composite_norm=spec != "te",
        mask_bias=role.explicit_mask and spec == "sdpa",
    )


def _training_activations(
    role: RolePlan, shards: RoleShards, shape: memory.LayerShape, recompute, sp
) -> float:
    """Worst rank: its layers' activations times the micro-batches its pipeline stage holds, plus the
    last stage's logits (an LM head) for the micro-batch in its backward pass."""
    par = role.activations
    sp = sp and role.tp > 1
    item = DTYPE_ITEMSIZE[role.model.params_dtype]
    worst = 0.0
    for r in shards.ranks:
        per_micro = memory.stage_activations(
            shape, r.layers, role.seq, role.micro_batch, role.tp, sp, recompute,
            par.recompute_method, par.recompute_num_layers, item,
        )  # fmt: skip
        total = per_micro * memory.micro_batches_in_flight(role.pp, r.pp_rank, role.micro_batches, role.vpp)
        if r.post_process and role.kind == "gpt":
            total += memory.logits_bytes(
                role.seq, role.micro_batch, role.model.padded_vocab_size(role.tp), role.tp, item
            )
        worst = max(worst, total)
    return worst


def _forward_working(role: RolePlan, shape: memory.LayerShape, batch: int, seq: int) -> float:
    """A forward without gradients keeps one layer's tensors at a time (bounded here by what a layer
    would save for its backward pass) plus the logits of the micro-batch."""
    item = DTYPE_ITEMSIZE[role.model.params_dtype]
    one_layer = sum(memory.layer_activations(shape, seq, batch, role.tp, False, None, item).values())
    if role.kind != "gpt":
        return one_layer
    return one_layer + memory.logits_bytes(seq, batch, role.model.padded_vocab_size(role.tp), role.tp, item)


def role_memory(role: RolePlan, rollout: Any = None, with_keys: bool = True) -> RoleMemory:
    spec = resolve_layer_spec(role.model.layer_spec)
    shards = role_shards(
        role.kind, role.model, role.tp, role.pp, role.dp, role.vpp, role.optim, role.overrides(), with_keys
    )
    other = None
    if role.trained and role.dp > 1:
        flipped = dataclasses.replace(
            role.optim, use_distributed_optimizer=not role.optim.use_distributed_optimizer
        )
        if flipped.overlap_param_gather and not flipped.use_distributed_optimizer:
            flipped = dataclasses.replace(flipped, overlap_param_gather=False)
        alt = role_shards(
            role.kind, role.model, role.tp, role.pp, role.dp, role.vpp, flipped, role.overrides(), False
        )
        other = max(r.weight_bytes + r.grad_bytes + max(r.optimizer_bytes) for r in alt.ranks)
    worst = max(shards.ranks, key=lambda r: r.weight_bytes + r.grad_bytes + max(r.optimizer_bytes or [0]))
    shape = layer_shape(role, spec)
    out = RoleMemory(
        plan=role,
        shards=shards,
        spec=spec,
        weights=worst.weight_bytes,
        grads=worst.grad_bytes,
        optimizer=max(worst.optimizer_bytes or [0]),
        other_optimizer=other,
        train_activations=0.0,
    )
    if role.trained:
        par = role.activations
        out.train_activations = _training_activations(
            role, shards, shape, par.recompute_granularity, par.sequence_parallel
        )
        for label, recompute, sp in ACTIVATION_CHOICES:
            if sp and role.tp == 1:
                continue
            out.activation_choices[label] = _training_activations(role, shards, shape, recompute, sp)
    out.forward_working = _forward_working(role, shape, role.micro_batch, role.seq)
    if rollout is not None and role.name == "actor":
        item = DTYPE_ITEMSIZE[role.model.params_dtype]
        layers = max(r.layers for r in shards.ranks)
        out.kv_cache = memory.kv_cache_bytes(
            layers, role.model.num_query_groups, role.model.head_dim, role.tp, rollout.batch_per_rank,
            rollout.prompt_tokens + rollout.new_tokens, item,
        )  # fmt: skip
        out.prefill_working = _forward_working(role, shape, rollout.batch_per_rank, rollout.prompt_tokens)
    return out


@dataclass
class Phase:
    name: str
    resident: float
    working: float
    what: str

    @property
    def total(self) -> float:
        return self.resident + self.working


def phases(job: JobPlan, roles: list[RoleMemory]) -> list[Phase]:
    resident = sum(r.resident for r in roles)
    trained = [r for r in roles if r.plan.trained]
    if job.rollout is None:
        (r,) = roles
        return [
            Phase(
                "train",
                resident,
                r.train_activations,
                f"activations of {r.plan.micro_batches} micro-batches in flight (worst stage)",
            )
        ]
    actor = next(r for r in roles if r.plan.name == "actor")

    def scoring_cost(r: RoleMemory) -> float:
        return r.forward_working + (r.weights if r.plan.offloaded else 0)

    scorer = max(roles, key=scoring_cost)
    updater = max(trained, key=lambda r: r.train_activations)
    return [
        Phase(
            "rollout",
            resident,
            actor.kv_cache + actor.prefill_working,
            "actor KV cache at the length cap + prefill",
        ),
        Phase(
            "scoring",
            resident,
            scoring_cost(scorer),
            f"{scorer.plan.name} forward" + (" (loaded from CPU)" if scorer.plan.offloaded else ""),
        ),
        Phase("update", resident, updater.train_activations, f"{updater.plan.name} activations"),
    ]


def advice(job: JobPlan, roles: list[RoleMemory], plan_phases: list[Phase], gpu_bytes: float) -> list[str]:
    """What to change when a phase does not fit, each with the figure it gives."""
    lines = []
    for ph in plan_phases:
        if ph.total <= gpu_bytes:
            continue
        over = ph.total - gpu_bytes
        lines.append(f"{ph.name} needs {memory.gib(ph.total):.1f} GiB, {memory.gib(over):.1f} GiB over:")
        if ph.name in ("train", "update"):
            trained = [r for r in roles if r.plan.trained]
            worst = max(r.train_activations for r in trained)
            for label, recompute, sp in ACTIVATION_CHOICES:
                if label not in trained[0].activation_choices:
                    continue
                value = max(
                    r.activation_choices[label] for r in trained
                )  # parallel.* sets every trained role
                if value >= worst:
                    continue
                knobs = " ".join(
                    [f"parallel.recompute_granularity={recompute or 'null'}"]
                    + (["parallel.sequence_parallel=true"] if sp else [])
                )
                total = ph.total - worst + value
                verdict = "fits" if total <= gpu_bytes else "still over"
                lines.append(f"  - {label}: {knobs} -> {memory.gib(total):.1f} GiB ({verdict})")
            r = max(trained, key=lambda r: r.train_activations)
            for t in (t for t in roles if t.plan.trained and t.other_optimizer is not None):
                if not t.plan.optim.use_distributed_optimizer:
                    saved = t.weights + t.grads + t.optimizer - t.other_optimizer
                    lines.append(
                        f"  - {t.plan.name}: optim.use_distributed_optimizer=true -> saves {memory.gib(saved):.1f} GiB"
                    )
            lines.append(
                f"  - fewer sequences per micro-batch (now {r.plan.micro_batch}): activations scale with it"
            )
        if ph.name == "rollout":
            lines.append(
                f"  - fewer prompts per actor rank (now {job.rollout.batch_per_rank}: ppo.rollout_batch_size / actor DP): "
                "the KV cache scales with it; or a larger actor TP"
            )
        frozen = [r for r in roles if not r.plan.trained and not r.plan.offloaded]
        if frozen:
            saved = sum(r.weights for r in frozen)
            lines.append(
                f"  - offload_frozen=true -> saves {memory.gib(saved):.1f} GiB outside their forward passes"
            )
    return lines


def _g(n: float) -> str:
    return f"{memory.gib(n):.2f}"


def render(job: JobPlan, roles: list[RoleMemory], plan_phases: list[Phase], gpu_bytes: float) -> str:
    out = [f"c2f plan: {job.title} on {job.world} GPUs of {memory.gib(gpu_bytes):.0f} GiB (per GPU, GiB)"]
    out.append("")
    out.append(
        "| role | layout | spec | params/GPU | weights | grads | optimizer | other optimizer | train activations | forward | KV cache |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in roles:
        p = r.plan
        layout = f"TP{p.tp} PP{p.pp} DP{p.dp}" + (f" VPP{p.vpp}" if p.vpp else "")
        params = max(x.params for x in r.shards.ranks)
        other = (
            ""
            if r.other_optimizer is None
            else (
                f"{_g(r.other_optimizer)} total {'without' if p.optim.use_distributed_optimizer else 'with'} dist. opt."
            )
        )
        state = "trained" if p.trained else ("frozen, offloaded" if p.offloaded else "frozen")
        out.append(
            f"| {p.name} ({state}) | {layout} | {r.spec} | {params:,} | {_g(r.weights)} | {_g(r.grads)} | "
            f"{_g(r.optimizer)} | {other} | {_g(r.train_activations) if p.trained else ''} | "
            f"{_g(r.forward_working)} | {_g(r.kv_cache) if r.kv_cache else ''} |"
        )
    out.append("")
    out.append("| phase | resident | working | peak | fits | working memory |")
    out.append("|---|---|---|---|---|---|")
    for ph in plan_phases:
        fits = "yes" if ph.total <= gpu_bytes else "NO"
        out.append(
            f"| {ph.name} | {_g(ph.resident)} | {_g(ph.working)} | {_g(ph.total)} | {fits} | {ph.what} |"
        )
    trained = [r for r in roles if r.plan.trained]
    if trained:
        out.append("")
        out.append("Activations per GPU of each trained role, by option (GiB):")
        for r in trained:
            p = r.plan
            choices = ", ".join(f"{k} {_g(v)}" for k, v in r.activation_choices.items())
            out.append(f"  {p.name} ({p.micro_batch} x {p.seq} tokens per micro-batch): {choices}")
    frozen = [r for r in roles if not r.plan.trained]
    if frozen:
        saved = sum(r.weights for r in frozen)
        now = "saves" if all(r.plan.offloaded for r in frozen) else "would save"
        out.append(
            f"Offloading the frozen roles (offload_frozen) {now} {_g(saved)} GiB per GPU outside their forward passes."
        )
    for r in roles:
        out.append(
            f"{r.plan.name}: architecture from {r.plan.architecture_from}; {r.shards.total_params(r.plan.model.vocab_size):,} parameters"
        )
    tips = advice(job, roles, plan_phases, gpu_bytes)
    if tips:
        out.append("")
        out.extend(tips)
    return "\n".join(out)


def to_json(
    job: JobPlan, roles: list[RoleMemory], plan_phases: list[Phase], gpu_bytes: float
) -> dict[str, Any]:
    return {
        "title": job.title,
        "world": job.world,
        "gpu_bytes": gpu_bytes,
        "roles": [
            {
                "name": r.plan.name,
                "kind": r.plan.kind,
                "tp": r.plan.tp,
                "pp": r.plan.pp,
                "dp": r.plan.dp,
                "spec": r.spec,
                "trained": r.plan.trained,
                "offloaded": r.plan.offloaded,
                "total_params": r.shards.total_params(r.plan.model.vocab_size),
                "total_params_padded": r.shards.total_params(),
                "model": r.plan.model.to_dict(),
                "ranks": [dataclasses.asdict(x) for x in r.shards.ranks],
                "weights": r.weights,
                "grads": r.grads,
                "optimizer": r.optimizer,
                "other_optimizer_total": r.other_optimizer,
                "train_activations": r.train_activations,
                "activation_choices": r.activation_choices,
                "forward_working": r.forward_working,
                "kv_cache": r.kv_cache,
            }
            for r in roles
        ],
        "phases": [
            {"name": p.name, "resident": p.resident, "working": p.working, "total": p.total}
            for p in plan_phases
        ],
    }
