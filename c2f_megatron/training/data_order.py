"""Which samples each rank trains on at each step: a pure function of (seed, step), so resumes are exact.

The training stream is an endless sequence of epochs, each a seeded permutation of the dataset; step ``t``
consumes stream positions ``[t*G, (t+1)*G)`` for global batch size ``G``. Data-parallel rank ``r`` takes
the ``r``-th contiguous slice of that global batch and cuts it into micro-batches. Resuming needs only the
step (or the consumed-sample count) and the seed.
"""

from __future__ import annotations

import numpy as np


class DataOrder:
    """Seeded epoch permutations over ``num_samples`` items."""

    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError("the training set is empty")
        self.num_samples = num_samples
        self.seed = seed
        self._cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cache = (epoch, rng.permutation(self.num_samples))
        return self._cache[1]

    def indices(self, start: int, count: int) -> list[int]:
        """Dataset indices at stream positions ``start .. start+count-1``."""
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, self.num_samples)
            out.append(int(self.permutation(epoch)[offset]))
        return out

    def microbatches(
        self, step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[list[int]]:
        """This rank's micro-batches (lists of dataset indices) for optimizer step ``step`` (0-based)."""
        per_rank = global_batch_size // dp_size
        start = step * global_batch_size + dp_rank * per_rank
        mine = self.indices(start, per_rank)
        return [mine[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def epoch_of(step: int, global_batch_size: int, num_samples: int) -> float:
    """Fractional epoch reached after ``step`` steps (for logs)."""
    return step * global_batch_size / max(num_samples, 1)
