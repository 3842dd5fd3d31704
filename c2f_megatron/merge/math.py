"""The merge arithmetic in torch, as small pure functions over tensors (no files, no ranks): the reference.

Every merge is evaluated in fp32 with one fixed order of operations, so that a result is reproducible
bit for bit and the tests can compare against the direct formula:

- weighted (N-way, and linear as its 2-way case): ``w0*x0 + w1*x1 + ... + wn*xn`` evaluated left to right,
  each product and each sum rounded to fp32 (never fused), i.e. exactly
  ``w0 * x0.float() + w1 * x1.float() + ...`` in torch. Linear is ``weighted([a, b], [g, 1 - g])``.
  A python float weight becomes fp32 before it multiplies (torch casts the scalar to the op's dtype).
- task vector: ``b + g*(a - base)``, i.e. exactly ``b.float() + g * (a.float() - base.float())``.
- the output dtype is reached from the fp32 result by one ``.to(dtype)`` (round to nearest even). A NaN is
  written as the positive quiet NaN of the output dtype (fp32 0x7FC00000, bf16 0x7FC0, fp16 0x7E00):
  torch's vectorised conversions write other NaN bits on AVX2/AVX-512 (bf16 0xFFFF) than its scalar ones
  (0x7FC0), so without this the bytes of a merge would depend on the CPU.

``ChunkedMerger`` evaluates recipes over large tensors in cache-sized chunks with reused buffers: a merge is
memory-bound, and staying in L2 between the conversions and the arithmetic is what makes it fast. The HF
merge uses the single-pass native kernel (``native``) for the same formulas and this module where the
kernel does not apply (another dtype, no C compiler, ``C2F_MERGE_NATIVE=0``); the tests hold the two equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from c2f_megatron.merge.recipe import MergeRecipe

__all__ = [
    "CHUNK_ELEMENTS",
    "ChunkedMerger",
    "TORCH_DTYPES",
    "evaluate",
    "evaluate_into",
    "linear",
    "task_vector",
    "weighted",
]

# Elements per chunk of the chunked kernels: a few fp32 work buffers of 64K elements stay in the L2 cache.
# Measured on 2 shared cores: 64K chunks with one thread run the bf16 linear merge at ~0.45 s per 1e9
# elements; intra-op threads on chunks this size lose more to synchronisation than they gain.
CHUNK_ELEMENTS = 1 << 16
# safetensors dtype names (the raw-buffer interface of ``ChunkedMerger.merge_buffers``).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# The NaN every output dtype gets (see the module docstring), written through an integer view.
_CANONICAL_NAN: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.float64: (torch.int64, 0x7FF8000000000000),
    torch.float32: (torch.int32, 0x7FC00000),
    torch.float16: (torch.int16, 0x7E00),
    torch.bfloat16: (torch.int16, 0x7FC0),
}


def weighted(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i * x_i`` in fp32, left to right (the reference formula; allocates)."""
    _check_weights(tensors, weights)
    out = weights[0] * tensors[0].float()
    for x, w in zip(tensors[1:], weights[1:]):
        out = out + w * x.float()
    return out


def linear(a: Tensor, b: Tensor, gamma: float) -> Tensor:
    """The Fine Actor: ``gamma * a + (1 - gamma) * b`` in fp32."""
    return weighted([a, b], [gamma, 1.0 - gamma])


def task_vector(a: Tensor, b: Tensor, base: Tensor, gamma: float) -> Tensor:
    """``b + gamma * (a - base)`` in fp32: add the scaled difference ``a - base`` to ``b``."""
    return b.float() + gamma * (a.float() - base.float())


def evaluate(recipe: MergeRecipe, inputs: Sequence[Tensor]) -> Tensor:
    """The reference evaluation of one recipe (allocating), used by tests and small tensors."""
    if recipe.kind == "task":
        return task_vector(inputs[0], inputs[1], inputs[2], recipe.weights[0])
    return weighted(inputs, recipe.weights)


def evaluate_into(recipe: MergeRecipe, out: Tensor, inputs: Sequence[Tensor], tmp: Tensor) -> Tensor:
    """``evaluate`` into the fp32 ``out`` with fp32 ``inputs`` and scratch ``tmp`` (same shape): no
    allocation, bitwise equal to ``evaluate``."""
    if recipe.kind == "task":
        a, b, base = inputs
        torch.sub(a, base, out=tmp)
        tmp.mul_(recipe.weights[0])
        return torch.add(b, tmp, out=out)
    torch.mul(inputs[0], recipe.weights[0], out=out)
    for x, w in zip(inputs[1:], recipe.weights[1:]):
        torch.mul(x, w, out=tmp)
        out.add_(tmp)
    return out


def _check_weights(tensors: Sequence[Tensor], weights: Sequence[float]) -> None:
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"need one weight per tensor, got {len(tensors)} tensors and {len(weights)} weights")
    MergeRecipe("weighted", tuple(weights))  # the same weight checks as a recipe


class ChunkedMerger:
    """Evaluates several recipes over the same inputs chunk by chunk, converting each input to fp32 once.

    ``merge(inputs, outputs)`` reads every input element once and writes every output once; memory beyond
    the tensors themselves is a handful of ``chunk``-sized fp32 buffers, reused across calls.
    ``copy_inputs`` always stages inputs in the buffers, so an output may alias an input (in-place merge).
    """

    def __init__(
        self, recipes: Sequence[MergeRecipe], chunk: int = CHUNK_ELEMENTS, copy_inputs: bool = False
    ) -> None:
        if not recipes:
            raise ValueError("no merge recipe given")
        n = {r.num_inputs for r in recipes}
        if len(n) != 1:
            raise ValueError("all recipes of one merge must take the same inputs")
        self.recipes = list(recipes)
        self.num_inputs = n.pop()
        self.chunk = chunk
        self.copy_inputs = copy_inputs
        self._in = [torch.empty(chunk, dtype=torch.float32) for _ in range(self.num_inputs)]
        self._out = torch.empty(chunk, dtype=torch.float32)
        self._tmp = torch.empty(chunk, dtype=torch.float32)

    def merge(self, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> None:
        """``outputs[k] = recipes[k](inputs)`` for flat-compatible tensors of equal numel (any float dtypes)."""
        flat_in = [x.reshape(-1) for x in inputs]
        flat_out = [y.view(-1) for y in outputs]
        numel = flat_in[0].numel()
        for start in range(0, numel, self.chunk):
            stop = min(start + self.chunk, numel)
            self.merge_chunk([x[start:stop] for x in flat_in], [y[start:stop] for y in flat_out])

    def merge_chunk(self, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> None:
        """One chunk (at most ``chunk`` elements, 1-D): convert inputs once, evaluate every recipe."""
        n = inputs[0].numel()
        if n > self.chunk:
            raise ValueError(f"chunk of {n} elements exceeds the buffer size {self.chunk}")
        ins = []
        for buf, x in zip(self._in, inputs):
            if x.dtype == torch.float32 and not self.copy_inputs:
                ins.append(x)
            else:
                ins.append(buf[:n].copy_(x))
        out, tmp = self._out[:n], self._tmp[:n]
        for recipe, y in zip(self.recipes, outputs):
            if y.dtype == torch.float32:
                evaluate_into(recipe, y, ins, tmp)
            else:
                y.copy_(evaluate_into(recipe, out, ins, tmp))
            pin_nans(y)

    def merge_buffers(
        self,
        inputs: Sequence[bytearray],
        in_dtype: str,
        outputs: Sequence[bytearray],
        out_dtype: str,
        n: int,
    ) -> None:
        """``merge`` over the first ``n`` elements of raw little-endian buffers (safetensors dtype names);
        the same interface as the native kernel, so the HF merge can use either."""
        if n == 0:
            return
        src, dst = TORCH_DTYPES[in_dtype], TORCH_DTYPES[out_dtype]
        isz, osz = src.itemsize, dst.itemsize
        xs = [torch.frombuffer(b, dtype=torch.uint8, count=n * isz).view(src) for b in inputs]
        ys = [torch.frombuffer(b, dtype=torch.uint8, count=n * osz).view(dst) for b in outputs]
        self.merge(xs, ys)


def pin_nans(y: Tensor) -> None:
    """Overwrite every NaN of ``y`` with the canonical NaN of its dtype (a no-op without NaN).

    A NaN anywhere makes the sum NaN, and a sum is one cheap pass without a mask; only then (or for
    ``inf - inf`` in the sum) is the mask built."""
    if not bool(torch.isnan(y.sum(dtype=torch.float64 if y.dtype == torch.float64 else torch.float32))):
        return
    nan = torch.isnan(y)
    if bool(nan.any()):
        view_dtype, bits = _CANONICAL_NAN[y.dtype]
        y.view(view_dtype).masked_fill_(nan, bits)
