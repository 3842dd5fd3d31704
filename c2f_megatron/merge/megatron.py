"""Merge c2f megatron checkpoints rank-parallel: each rank reads, merges and writes only its own shards.

Every rank builds the model at the output layout (``--tp``/``--pp``, any number of data-parallel replicas),
without random initialisation, and loads each input through megatron's ``dist_checkpointing`` (which reads
only this rank's slice of every global tensor, whatever TP/PP the input was saved at, and casts to the
model's dtype). The merge then runs parameter by parameter in fp32 chunks, and the result is saved with
``save_model_checkpoint`` (atomic ``.partial`` + rename, metadata with provenance).

Memory per rank: the inputs but the last are kept as copies of this rank's shards; the last input stays in
the loading model, which also receives the output when there is one output of the inputs' dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from c2f_megatron.merge import MergeError, check_outputs_free, provenance
from c2f_megatron.merge.math import ChunkedMerger
from c2f_megatron.merge.recipe import MergeRecipe


def check_metadata(inputs: Sequence[Path], labels: Sequence[str], dtype: str | None):
    """Read every ``c2f_checkpoint.json``; refuse differing model config fields, tokenizer or kind."""
    from c2f_megatron.checkpoint.megatron_dir import METADATA_FILE, CheckpointError, read_metadata
    from c2f_megatron.checkpoint.resolve import check_tokenizer
    from c2f_megatron.models.config import RUNTIME_FIELDS

    metas = [read_metadata(p) for p in inputs]
    ref = metas[0]
    if ref.kind != "gpt":
        raise MergeError(f"{inputs[0] / METADATA_FILE}: kind {ref.kind!r}; only 'gpt' checkpoints are merged")
    for meta, path, label in zip(metas[1:], inputs[1:], labels[1:]):
        for field in dataclasses.fields(ref.model):
            if field.name in RUNTIME_FIELDS or (field.name == "params_dtype" and dtype is not None):
                continue  # kernels and dropout are run-time choices, not the architecture
            va, vb = getattr(ref.model, field.name), getattr(meta.model, field.name)
            if va != vb:
                raise MergeError(
                    f"{path / METADATA_FILE}: field model.{field.name} is {vb!r} in {label} but {va!r} in "
                    f"{labels[0]} ({inputs[0]}); the checkpoints are not the same architecture"
                )
        if meta.kind != ref.kind:
            raise MergeError(
                f"{path / METADATA_FILE}: field kind is {meta.kind!r} in {label}, {ref.kind!r} in {labels[0]}"
            )
        try:  # the same vocabulary (where it was recorded from) is the same tokenizer
            where = f"{path / METADATA_FILE} ({label} vs {labels[0]})"
            check_tokenizer(meta.tokenizer, ref, where, embedding_rows=False)
        except CheckpointError as exc:
            raise MergeError(f"{exc}; a different vocabulary is a different model") from exc
    return metas


def check_layout(model_cfg, tp: int, pp: int, source: Path) -> None:
    """Refuse an output layout the model cannot take, before any process group exists."""
    if tp < 1 or pp < 1:
        raise MergeError(f"--tp and --pp must be >= 1, got --tp {tp} --pp {pp}")
    if model_cfg.num_layers % pp:
        raise MergeError(f"--pp {pp} does not divide num_layers {model_cfg.num_layers} of {source}")
    for what in ("num_attention_heads", "num_query_groups"):
        if getattr(model_cfg, what) % tp:
            raise MergeError(f"--tp {tp} does not divide {what} {getattr(model_cfg, what)} of {source}")


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating-point state tensors (sharing storage with the parameters)."""
    return {
        k: v
        for k, v in model.state_dict(keep_vars=False).items()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    }


def merge_megatron(
    inputs: Sequence[str | Path],
    roles: Sequence[str],
    recipes: Sequence[MergeRecipe],
    outs: Sequence[str | Path],
    dtype: str | None = None,
    force: bool = False,
    tp: int = 1,
    pp: int = 1,
) -> list[Path]:
    """Write ``outs[k] = recipes[k](inputs)`` at layout TP x PP; call on every rank (torchrun/srun or alone)."""
    from c2f_megatron.checkpoint.megatron_dir import CheckpointMetadata, save_model_checkpoint
    from c2f_megatron.engine.role_model import RoleModel
    from c2f_megatron.engine.weights import load_weights
    from c2f_megatron.models.config import DTYPES
    from c2f_megatron.platform.distributed import ParallelConfig, init_distributed

    inputs = [Path(p) for p in inputs]
    out_paths = [Path(o) for o in outs]
    labels = [f"--{r}" if r in ("a", "b", "base") else r for r in roles]
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    metas = check_metadata(inputs, labels, dtype)
    check_outputs_free(out_paths, force)
    ref = metas[0]
    check_layout(ref.model, tp, pp, inputs[0])
    in_dtypes = {m.model.params_dtype for m in metas}
    load_dtype = in_dtypes.pop() if len(in_dtypes) == 1 else "fp32"  # fp32 holds bf16/fp16 exactly
    out_dtype = dtype or ref.model.params_dtype
    try:
        init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        model_cfg = dataclasses.replace(ref.model, params_dtype=load_dtype)
        model = RoleModel.build("merge", "gpt", model_cfg, initialize=False).module
    except ValueError as exc:
        raise MergeError(f"cannot merge at --tp {tp} --pp {pp}: {exc}") from exc

    kept: list[dict[str, torch.Tensor]] = []
    for path in inputs[:-1]:
        load_weights("gpt", [model], path)
        kept.append({k: v.clone() for k, v in _tensors(model).items()})
    load_weights("gpt", [model], inputs[-1])
    last = _tensors(model)
    in_place = len(recipes) == 1 and out_dtype == load_dtype
    out_model = model
    if not in_place:
        out_cfg = dataclasses.replace(ref.model, params_dtype=out_dtype)
        out_model = RoleModel.build("merge", "gpt", out_cfg, initialize=False).module
    out_tensors = _tensors(out_model)
    if set(out_tensors) != set(last):
        raise MergeError("internal: output model tensors differ from the input model's")

    written = []
    for recipe, out in zip(recipes, out_paths):
        merger = ChunkedMerger([recipe], copy_inputs=in_place)
        with torch.no_grad():
            for name, y in out_tensors.items():
                merger.merge([*(k[name] for k in kept), last[name]], [y])
        record = provenance("megatron", inputs, recipe, out_dtype, roles)
        record["layout"] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
        metadata = CheckpointMetadata(
            model=dataclasses.replace(ref.model, params_dtype=out_dtype),
            tokenizer=ref.tokenizer,
            kind=ref.kind,
            dtype=out_dtype,
            provenance={"merge": record},
        )
        written.append(save_model_checkpoint([out_model], out, metadata, force=force))
    return written
