"""The real shards of a role on every rank, counted on the meta device.

For each ``(tp_rank, pp_rank)`` of a layout the role's model is built as megatron's ``GPTModel`` (our
``RoleModel`` chunks, the same code a run uses) inside ``platform.meta.fake_rank``; a trained role is
also wrapped in megatron's ``DistributedDataParallel``, whose parameter and gradient buffers (padding
included) are laid out on the meta device too. The optimizer's share of each data-parallel rank comes from
megatron's own range map (``DistributedOptimizer._build_model_gbuf_param_range_map``) over those buffers,
so the bytes are the ones megatron would allocate, not a formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from c2f_megatron.engine.config import OptimConfig
from c2f_megatron.models.config import DTYPE_ITEMSIZE, ModelConfig

ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32
STEP_BYTES = 4  # torch Adam's per-parameter ``step``: a float32 scalar tensor
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class RankShards:
    """One rank of a role: what it holds, in elements and bytes (``optimizer`` per data-parallel rank)."""

    tp_rank: int
    pp_rank: int
    params: int  # parameters on this rank
    layers: int  # transformer layers on this rank (all chunks)
    pre_process: bool
    post_process: bool
    weight_bytes: int  # what the parameters occupy (the DDP parameter buffer with the distributed optimizer)
    grad_bytes: int = 0  # the DDP gradient buffer
    optimizer_bytes: list[int] = field(default_factory=list)  # by data-parallel rank
    main_params: list[int] = field(default_factory=list)  # elements each DP rank's optimizer updates
    sharded_keys: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key -> global shape
    spec_modules: dict[str, str] = field(default_factory=dict)  # submodule -> class of layer 0


@dataclass
class RoleShards:
    """A role on its layout: one ``RankShards`` per ``(tp_rank, pp_rank)`` (data-parallel ranks hold the
    same model and differ only in their optimizer share)."""

    kind: str
    tp: int
    pp: int
    dp: int
    vpp: int | None
    ranks: list[RankShards]

    def keys(self) -> dict[str, tuple[int, ...]]:
        """Every key of the sharded state dict (the union over ranks) and its global shape."""
        out: dict[str, tuple[int, ...]] = {}
        for r in self.ranks:
            out.update(r.sharded_keys)
        return out

    def total_params(self, vocab_size: int | None = None) -> int:
        """Parameters of the whole model, from the sharded state dict's global shapes (each tensor once,
        a tied output layer not at all); ``vocab_size`` trims the vocab padding rows, as HF counts."""
        total = 0
        for key, shape in self.keys().items():
            if key.endswith("_extra_state") or not shape:
                continue
            dims = list(shape)
            if vocab_size is not None and key in VOCAB_KEYS and dims[0] >= vocab_size:  # not a scalar head
                dims[0] = vocab_size
            n = 1
            for d in dims:
                n *= d
            total += n
        return total


def _optimizer_share(
    buffers: list[Any], dp: int, dtype: str, distributed: bool
) -> tuple[list[int], list[int]]:
    """(main-parameter elements, optimizer bytes) of each data-parallel rank over a chunk's DDP buffers."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer, Range

    copies = 4 if DTYPE_ITEMSIZE[dtype] < 4 else 0  # fp32 main parameters of 16-bit weights
    per_element = copies + 4 * ADAM_STATES
    elements, nbytes = [], []
    for r in range(dp if distributed else 1):
        numel = tensors = 0
        for buf in buffers:
            if not distributed:
                numel += sum(p.numel() for p in buf.params)
                tensors += len(buf.params)
                continue
            for bucket in buf.buckets:
                size = bucket.grad_data.numel() // dp
                world = Range(r * size + bucket.offset, (r + 1) * size + bucket.offset)
                ranges = DistributedOptimizer._build_model_gbuf_param_range_map(
                    buf.param_index_map, world, bucket.offset
                )
                numel += sum(v["param"].size for v in ranges.values())
                tensors += len(ranges)
        elements.append(numel)
        nbytes.append(numel * per_element + tensors * STEP_BYTES)
    if not distributed:
        elements, nbytes = elements * dp, nbytes * dp
    return elements, nbytes


def _sharded_keys(chunks: list[Any], layout: Any) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> global shape of every tensor this rank saves (factories built, as a save does)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    out: dict[str, tuple[int, ...]] = {}
    for chunk in chunks:
        sd = chunk.sharded_state_dict(metadata=layout.sharded_state_metadata())
        apply_factories(sd)
        sharded, _ = extract_sharded_base(sd)

        def visit(node: Any) -> None:
            if isinstance(node, dict):
                for v in node.values():
                    visit(v)
            elif isinstance(node, list):
                for v in node:
                    visit(v)
            elif isinstance(node, ShardedTensor):
                out[node.key] = tuple(node.global_shape)

        visit(sharded)
    return out


def _spec_modules(chunk: Any) -> dict[str, str]:
    from c2f_megatron.checkpoint.megatron_dir import unwrap_model

    model = unwrap_model(chunk)
    layers = model.decoder.layers
    if not len(layers):
        return {}
    layer = layers[0]
    names = {
        "input_layernorm": layer.input_layernorm,
        "core_attention": layer.self_attention.core_attention,
        "linear_qkv": layer.self_attention.linear_qkv,
        "pre_mlp_layernorm": layer.pre_mlp_layernorm,
        "linear_fc1": layer.mlp.linear_fc1,
    }
    if model.decoder.final_layernorm is not None:
        names["final_layernorm"] = model.decoder.final_layernorm
    return {k: type(v).__name__ for k, v in names.items()}


def role_shards(
    kind: str,
    model_cfg: ModelConfig,
    tp: int,
    pp: int,
    dp: int,
    vpp: int | None = None,
    optim: OptimConfig | None = None,
    config_overrides: dict[str, Any] | None = None,
    with_keys: bool = True,
) -> RoleShards:
    """Build ``kind`` (``gpt`` or ``value``) at TP x PP x DP on the meta device, rank by rank; ``optim``
    given, as a trained role (DDP buffers and the optimizer's share)."""
    from c2f_megatron.engine.role_model import build_chunks
    from c2f_megatron.engine.schedule import wrap_ddp
    from c2f_megatron.platform.meta import fake_rank
    from c2f_megatron.platform.role_layout import global_layout

    world = tp * pp * dp
    ranks = []
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            rank = tp_rank + tp * dp * pp_rank  # megatron's order: tp fastest, then dp, then pp
            with fake_rank(rank, world, tp, pp, vpp):
                layout = global_layout(kind)
                chunks = build_chunks(kind, model_cfg, layout, initialize=False, **(config_overrides or {}))
                params = sum(p.numel() for c in chunks for p in c.parameters())
                item = DTYPE_ITEMSIZE[model_cfg.params_dtype]
                shards = RankShards(
                    tp_rank=tp_rank,
                    pp_rank=pp_rank,
                    params=params,
                    layers=sum(len(c.decoder.layers) for c in chunks),
                    pre_process=chunks[0].pre_process,
                    post_process=chunks[-1].post_process,
                    weight_bytes=params * item,
                    spec_modules=_spec_modules(chunks[0]),
                )
                if with_keys:
                    shards.sharded_keys = _sharded_keys(chunks, layout)
                if optim is not None:
                    ddp = wrap_ddp(chunks, optim, layout)
                    buffers = [b for c in ddp for b in c.buffers + c.expert_parallel_buffers]
                    if optim.use_distributed_optimizer:  # the parameters now live in the padded buffers
                        shards.weight_bytes = sum(b.param_data.numel() * item for b in buffers)
                    shards.grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
                    shards.main_params, shards.optimizer_bytes = _optimizer_share(
                        buffers, dp, model_cfg.params_dtype, optim.use_distributed_optimizer
                    )
                ranks.append(shards)
    return RoleShards(kind, tp, pp, dp, vpp, ranks)
