"""Knowledge Residue Merger: gamma-weighted merges of two (or N) checkpoints of one architecture.

The Fine Actor of Mistral-C2F is ``gamma * theta_coarse + (1 - gamma) * theta_sft``. ``math`` holds the
arithmetic, ``gamma`` the sweep parsing, ``hf`` the streaming merge of HF safetensors directories,
``megatron`` the rank-parallel merge of c2f megatron checkpoints, ``cli`` the command line. This module holds
what both modes share: the refusal error and the provenance record.

The HF path (``cli`` -> ``hf`` -> ``native``) never imports torch, whose import alone takes longer than
merging a 1B model from a warm page cache; ``recipe`` is the torch-free description of an output, ``native``
the C kernel, ``engine`` the per-chunk choice between them, ``math`` the torch reference and fallback;
outputs are written atomically with ``checkpoint.atomic_dir``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from c2f_megatron.merge.recipe import MergeRecipe

TOOL_NAME = "c2f_megatron.merge"


class MergeError(ValueError):
    """Inputs or options a merge refuses; the message names the file, field or tensor."""


def provenance(
    mode: str, inputs: Sequence[str | Path], recipe: MergeRecipe, dtype: str, roles: Sequence[str]
) -> dict[str, Any]:
    """What produced a merged checkpoint: sources (with roles), formula, weights, dtype, tool version."""
    from c2f_megatron import __version__

    record: dict[str, Any] = {
        "tool": TOOL_NAME,
        "tool_version": __version__,
        "mode": mode,
        "kind": recipe.kind,
        "sources": [{"role": r, "path": os.path.abspath(p)} for r, p in zip(roles, inputs)],
        "dtype": dtype,
        "arithmetic": "fp32",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if recipe.kind == "task":
        record["formula"] = "b + gamma * (a - base)"
        record["gamma"] = recipe.weights[0]
    elif roles[:2] == ["a", "b"] and len(roles) == 2:
        record["formula"] = "gamma * a + (1 - gamma) * b"
        record["gamma"] = recipe.weights[0]
    else:
        record["formula"] = "sum_i w_i * x_i"
    record["weights"] = list(recipe.weights)
    return record


def check_outputs_free(outs: Sequence[Path], force: bool) -> None:
    """Refuse before any work when an output exists (all of them are checked, none is created)."""
    if force:
        return
    existing = [str(p) for p in outs if p.exists()]
    if existing:
        raise MergeError(f"output already exists: {', '.join(existing)} (pass --force to replace)")
