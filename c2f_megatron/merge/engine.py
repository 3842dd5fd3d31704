"""Which implementation evaluates a chunk of raw buffers: the native kernel where it covers the dtypes,
torch's ``ChunkedMerger`` otherwise (float64 checkpoints, no C compiler, ``C2F_MERGE_NATIVE=0``).

Both take the same arguments (buffers, safetensors dtype names, an element count) and write the same bytes;
torch is imported only when a chunk needs it, so an HF merge of bf16/fp16/fp32 checkpoints never imports it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from c2f_megatron.merge import native
from c2f_megatron.merge.recipe import MergeRecipe

# Bytes per element of the safetensors float dtypes a merge accepts.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


class BufferMerger:
    """``merge(inputs, in_dtype, outputs, out_dtype, n)``: every recipe over the first ``n`` elements.

    ``used`` records which implementations ran ('native', 'torch'), for the tests and the benchmark.
    ``torch_threads``: torch intra-op threads while torch merges (restored by ``close``); one is fastest for
    cache-sized chunks on shared cores. ``None`` leaves torch's setting alone.
    """

    def __init__(self, recipes: Sequence[MergeRecipe], torch_threads: int | None = 1) -> None:
        self.recipes = list(recipes)
        self.torch_threads = torch_threads
        self.used: set[str] = set()
        self._native: native.NativeMerger | None = None
        self._torch: Any = None
        self._saved_threads: int | None = None
        self._arrays: dict[tuple[int, ...], tuple[list[ctypes.c_char], ctypes.Array]] = {}
        if native.enabled():
            try:
                self._native = native.NativeMerger(self.recipes)
            except native.NativeUnavailable as exc:
                native.notify_once(str(exc))

    def merge(
        self,
        inputs: Sequence[bytearray],
        in_dtype: str,
        outputs: Sequence[bytearray],
        out_dtype: str,
        n: int,
    ) -> None:
        """Evaluate every recipe over the first ``n`` elements (buffers sized for them, checked here: the
        kernel trusts its pointers)."""
        need_in, need_out = n * ITEMSIZE[in_dtype], n * ITEMSIZE[out_dtype]
        if any(len(b) < need_in for b in inputs) or any(len(b) < need_out for b in outputs):
            raise ValueError(f"buffers too small for {n} elements of {in_dtype} -> {out_dtype}")
        if self._native is not None and self._native.supports(in_dtype, out_dtype):
            self._native.merge_arrays(self._pointers(inputs), in_dtype, self._pointers(outputs), out_dtype, n)
            self.used.add("native")
        else:
            self._torch_merger().merge_buffers(inputs, in_dtype, outputs, out_dtype, n)
            self.used.add("torch")

    def _pointers(self, buffers: Sequence[bytearray]) -> ctypes.Array:
        """The kernel's pointer array for these buffers, built once (the HF stream reuses its buffer sets
        for every chunk). The cache holds a ctypes export of each buffer, which keeps it alive and makes
        resizing it an error, so a cached address cannot go stale."""
        key = tuple(id(b) for b in buffers)
        hit = self._arrays.get(key)
        if hit is None:
            if len(self._arrays) >= 64:  # callers that pass fresh buffers each time: bounded memory
                self._arrays.clear()
            exports = [ctypes.c_char.from_buffer(b) for b in buffers]
            hit = self._arrays[key] = (exports, native.pointer_array([ctypes.addressof(e) for e in exports]))
        return hit[1]

    def _torch_merger(self) -> Any:
        if self._torch is None:
            import torch

            from c2f_megatron.merge.math import ChunkedMerger

            if self.torch_threads is not None:
                self._saved_threads = torch.get_num_threads()
                torch.set_num_threads(self.torch_threads)
            self._torch = ChunkedMerger(self.recipes)
        return self._torch

    def close(self) -> None:
        """Release the buffers' exports; give torch back its thread setting (if torch ran)."""
        self._arrays.clear()
        if self._saved_threads is not None:
            import torch

            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None
