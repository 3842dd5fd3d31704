"""What one merged output is: a kind ('weighted' or 'task') and its weights, validated.

Kept free of torch (importing it costs ~1.5 s) so that the HF merge, which runs the native kernel, never
imports it; the torch evaluation lives in ``math`` and is imported only when a tensor is evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class MergeRecipe:
    """One output of a merge: ``kind`` 'weighted' (one weight per input, in input order) or 'task'
    (inputs are a, b, base; ``weights == (gamma,)``)."""

    kind: str
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("weighted", "task"):
            raise ValueError(f"unknown merge kind {self.kind!r}; expected 'weighted' or 'task'")
        if self.kind == "task" and len(self.weights) != 1:
            raise ValueError("a task-vector recipe has exactly one weight (gamma)")
        for w in self.weights:
            if not math.isfinite(w):
                raise ValueError(f"merge weight {w!r} is not a finite number")

    @property
    def num_inputs(self) -> int:
        return 3 if self.kind == "task" else len(self.weights)

    def apply(self, inputs: Sequence[Tensor]) -> Tensor:
        """The reference evaluation (allocating), used by tests and small tensors."""
        from c2f_megatron.merge.math import task_vector, weighted

        if self.kind == "task":
            return task_vector(inputs[0], inputs[1], inputs[2], self.weights[0])
        return weighted(inputs, self.weights)

    def apply_into(self, out: Tensor, inputs: Sequence[Tensor], tmp: Tensor) -> Tensor:
        """Evaluate into the fp32 ``out`` with fp32 ``inputs`` and scratch ``tmp`` (same shape): no allocation,
        bitwise equal to ``apply``."""
        import torch

        if self.kind == "task":
            a, b, base = inputs
            torch.sub(a, base, out=tmp)
            tmp.mul_(self.weights[0])
            return torch.add(b, tmp, out=out)
        torch.mul(inputs[0], self.weights[0], out=out)
        for x, w in zip(inputs[1:], self.weights[1:]):
            torch.mul(x, w, out=tmp)
            out.add_(tmp)
        return out
