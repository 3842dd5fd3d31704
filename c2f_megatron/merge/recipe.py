"""What one merged output is: a kind ('weighted' or 'task') and its weights, validated.

Kept free of torch (importing it costs ~1.5 s) so that the HF merge, which runs the native kernel, never
imports it; the torch evaluation of a recipe is ``math.evaluate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
