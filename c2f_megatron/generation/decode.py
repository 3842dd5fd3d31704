"""The KV-cached forward of a megatron GPT model chunk that generation runs on: the model's own modules,
our cache.

Why not megatron's ``StaticInferenceContext``: it caches keys *before* RoPE and re-applies RoPE to the whole
key cache of every layer at every step, stores the cache as [s, b, heads, dim] so that attention reads it
through a permuted view, and rebuilds the step's mask and positions each time. Here every layer's keys are
cached *after* RoPE in the layout attention reads ([b, kv heads, slots, dim]), the RoPE table is computed
once, the mask is a slice of one preallocated "key is real" tensor, and a decode step runs only the
new token through the layers. The layers' own modules do the rest (norms, the fused QKV projection and its
split, megatron's ``apply_rotary_pos_emb``, the output projection, bias-dropout-add, the MLP, the
vocab-parallel embedding and output layer with their TP communication), so the arithmetic is the
training forward's.

Slots and positions: a row's tokens live in slots 0..S-1 of its cache row, and a token's RoPE position is
its slot (as in ``rollout.RolloutBatch``). ``prefill`` runs any set of prompts packed into one sequence,
without padding (block-diagonal causal attention), each into its own cache row from a given slot on: the
left-padded rollout batch, or the prompts that take freed rows in continuous batching. ``decode`` runs one
token per row, each at its own slot, over the cache slots ``key_ok`` marks real.

GEMMs of a decode step (CPU, fp32): a decode step multiplies a few rows of hidden states by every weight,
where MKL's plain sgemm (``F.linear``) reaches a third of what oneDNN reaches on weights reordered once into
its blocked layout. So on CPU the decoder reorders each linear layer's weight and the output layer's once
(``PackedLinear``, an extra copy of the weights for the decoder's lifetime) and a decode step runs the
layers' own forward code with those GEMMs in place of the modules' (``_packed_gemms``). The products are
the same dot products summed in another order: logits differ from the training forward's by float
rounding. On GPU the modules' own GEMMs run (cuBLAS).

CUDA graphs (``cuda_graph=True``, GPU, one pipeline stage): the decoder records one decode step over
all its cache slots into a CUDA graph when it is built (static token, slot and ``key_ok`` buffers; a
warm-up on a side stream first, as ``torch.cuda.graphs`` requires; its cache writes cleared after), and
each ``decode`` copies its inputs into the buffers and replays the graph, so a step costs one launch
instead of a few hundred. Megatron's engine captures one graph per batch size; a decoder has one batch
size. The TP collectives are recorded with the rest (NCCL supports capture).

Supported: the ``sdpa`` and ``local`` specs (dense MLP, self-attention with RoPE or no position embedding,
a sliding window that looks back only, no query-key layer scaling), any TP, PP over the layout's pipeline group (hidden states
sent stage to stage), sequence parallelism off (``rollout.generate`` turns it off while it decodes).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from c2f_megatron.platform.role_layout import RoleLayout


def gpt_module(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside megatron's wrappers (DDP, ``Float16Module``)."""
    from megatron.core.models.gpt import GPTModel

    inner = model
    while not isinstance(inner, GPTModel):
        if not hasattr(inner, "module"):
            raise ValueError(f"{type(model).__name__} does not wrap a megatron GPTModel")
        inner = inner.module
    return inner


def check_decodable(gpt: torch.nn.Module) -> None:
    """Refuse what the decode forward does not implement, in one line naming the model field."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP

    config = gpt.config
    problems = []
    if config.window_size is not None and config.window_size[1] != 0:
        problems.append(f"window_size={config.window_size} (a window that sees later tokens)")
    if config.apply_query_key_layer_scaling:
        problems.append("apply_query_key_layer_scaling=True")
    if gpt.position_embedding_type not in ("rope", "none", "learned_absolute"):
        problems.append(f"position_embedding_type={gpt.position_embedding_type!r}")
    for i, layer in enumerate(gpt.decoder.layers):
        if not isinstance(layer.self_attention, SelfAttention):
            problems.append(f"layer {i}: {type(layer.self_attention).__name__} attention")
        if not isinstance(layer.cross_attention, IdentityOp):
            problems.append(f"layer {i}: cross-attention")
        if type(layer.mlp) is not MLP:
            problems.append(f"layer {i}: {type(layer.mlp).__name__} MLP (MoE)")
        if problems:
            break
    if problems:
        raise ValueError("generation does not support this model: " + "; ".join(problems))


# Vocabulary rows per slice of the output layer's product in a decode step (see ``KVDecoder._logits``).
LOGIT_SLICE = 2048


def _layer_window(config, layer_number: int) -> int | None:
    """How far back (in slots) layer ``layer_number`` attends, or None for the whole context."""
    from megatron.core.transformer.utils import is_layer_window_attention

    if config.window_size is None or config.window_size[0] < 0:
        return None
    if not is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        return None
    return int(config.window_size[0])


def packed_gemm_available(model: torch.nn.Module) -> bool:
    """Whether decode steps of ``model`` can use oneDNN's packed GEMMs: fp32 weights on CPU and a torch
    build with oneDNN."""
    weight = next(model.parameters())
    return (
        weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
    )


class PackedLinear(torch.nn.Module):
    """A megatron ``ColumnParallelLinear`` / ``RowParallelLinear`` forward (no sequence parallelism, a
    column layer's output kept sharded, a row layer's input already sharded) whose GEMM is oneDNN's on the
    weight reordered once for ``rows`` rows of input (``of``); the same return value ``(output, output
    bias)`` and TP all-reduce after a row-parallel product. Inference only (no autograd). A module only
    because megatron's layers call their linears through ``apply_module``; it holds no parameters."""

    def __init__(self, weight: Tensor, rows: int):
        super().__init__()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)
        self.row_parallel = False
        self.bias, self.skip_bias_add, self.tp_group, self.tp = None, False, None, 1

    @classmethod
    def of(cls, linear: torch.nn.Module, rows: int) -> PackedLinear:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        packed = cls(linear.weight, rows)
        if isinstance(linear, RowParallelLinear):
            assert linear.input_is_parallel and not linear.sequence_parallel
            packed.row_parallel = True
        else:
            assert isinstance(linear, ColumnParallelLinear), type(linear).__name__
            assert not linear.gather_output and not linear.sequence_parallel
        packed.bias = None if linear.bias is None else linear.bias.detach()
        packed.skip_bias_add = linear.skip_bias_add
        packed.tp_group = linear.tp_group
        packed.tp = linear.tp_group.size() if linear.tp_group is not None else 1
        return packed

    def product(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x @ weight.T (+ bias)`` over the last dimension of ``x``."""
        flat = x.reshape(-1, x.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        bias = None if self.skip_bias_add else self.bias
        if not self.row_parallel:
            return self.product(x, bias), (self.bias if self.skip_bias_add else None)
        out = self.product(x)
        if self.tp > 1:
            out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        if bias is not None:
            out = out + bias
        return out, (self.bias if self.skip_bias_add else None)


# The linear layers a decode step runs through ``PackedLinear``: (owner in a layer, attribute).
_GEMMS = (
    ("self_attention", "linear_qkv"),
    ("self_attention", "linear_proj"),
    ("mlp", "linear_fc1"),
    ("mlp", "linear_fc2"),
)


class KVDecoder:
    """A model chunk's KV-cached forward over ``batch`` cache rows of ``slots`` slots each (see the module
    docstring). Holds the cache; build one per generation call."""

    def __init__(
        self,
        model: torch.nn.Module,
        layout: RoleLayout,
        batch: int,
        slots: int,
        packed: bool | None = None,
        cuda_graph: bool = False,
    ):
        self.gpt = gpt_module(model)
        check_decodable(self.gpt)
        self.layout = layout
        self.config = self.gpt.config
        self.layers = list(self.gpt.decoder.layers)
        device = next(self.gpt.parameters()).device
        self.device = device
        self.batch, self.slots = batch, slots
        self.freqs = None  # [slots, 1, 1, rot_dim], megatron's own RoPE table
        if self.gpt.position_embedding_type == "rope":
            self.freqs = self.gpt.rotary_pos_emb(slots).to(device)
        dtype = self.config.params_dtype
        self.keys, self.values = [], []
        for layer in self.layers:
            attn = layer.self_attention
            groups = attn.num_query_groups_per_partition
            head_dim = attn.hidden_size_per_attention_head
            shape = (batch, groups, slots, head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))
        self.windows = [_layer_window(self.config, layer.layer_number) for layer in self.layers]
        self.hidden_size = self.config.hidden_size
        self.fusion = self.config.bias_dropout_fusion
        # decode-step GEMMs on weights packed once (see the module docstring); None: where available
        if packed is None:
            packed = packed_gemm_available(model)
        self.packed: list[dict[str, PackedLinear]] | None = None
        self.packed_output: PackedLinear | None = None
        if packed:
            self.packed = [
                {name: PackedLinear.of(getattr(getattr(layer, owner), name), batch) for owner, name in _GEMMS}
                for layer in self.layers
            ]
            if self.layout.is_last_stage:
                self.packed_output = PackedLinear(self._output_weight(), batch)
        self.graph: torch.cuda.CUDAGraph | None = None
        if cuda_graph:
            if device.type != "cuda" or layout.pp > 1:
                raise ValueError(
                    f"generation.cuda_graph needs a CUDA device and one pipeline stage "
                    f"(model on {device.type}, {layout.pp} stages)"
                )
            self._capture()

    # ------------------------------------------------------------------ pipeline stages
    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        src = self.layout.pp_ranks[self.layout.pp_rank - 1]
        torch.distributed.recv(buf, src=src, group=self.layout.pp_group)
        return buf

    def _send(self, hidden: Tensor) -> None:
        dst = self.layout.pp_ranks[self.layout.pp_rank + 1]
        torch.distributed.send(hidden.contiguous(), dst=dst, group=self.layout.pp_group)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], rows: list[int], starts: list[int]) -> Tensor | None:
        """Run ``prompts`` through this chunk packed into one sequence (no padding: each attends causally
        to its own tokens only), caching prompt ``i`` in cache row ``rows[i]`` at slots ``starts[i]``
        onward; the gathered logits [n, padded vocab] of each prompt's last token on the last stage (None
        on the others). The rows' earlier contents are not seen (the caller clears ``key_ok`` there)."""
        device = self.device
        lengths = [len(p) for p in prompts]
        if any(start + n > self.slots for start, n in zip(starts, lengths)):
            raise ValueError(f"a prompt runs past the cache's {self.slots} slots")
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
        segment = torch.repeat_interleave(
            torch.arange(len(prompts), device=device), torch.tensor(lengths, device=device)
        )
        row_of = torch.tensor(rows, dtype=torch.long, device=device)[segment]
        offset = torch.cumsum(torch.tensor([0, *lengths[:-1]], device=device), 0)[segment]
        slot_of = (
            torch.tensor(starts, dtype=torch.long, device=device)[segment]
            + torch.arange(len(ids), device=device)
            - offset
        )
        same = segment[:, None] == segment[None, :]
        causal = slot_of[None, :] <= slot_of[:, None]
        masks = {}
        for w in set(self.windows):
            allowed = same & causal
            if w is not None:  # megatron's window: keys from ``position - w`` on
                allowed &= slot_of[None, :] >= slot_of[:, None] - w
            masks[w] = allowed[None, None]  # [1, 1, N, N]
        hidden = self._run(ids[None, :], slot_of[None, :], slot_of, (row_of, slot_of), masks, None)
        if hidden is None:
            return None
        last = torch.cumsum(torch.tensor(lengths, device=device), 0) - 1
        return self._logits(self.gpt.decoder.final_layernorm(hidden[last, 0])).contiguous()

    @torch.no_grad()
    def decode(self, tokens: Tensor, slots: Tensor, key_ok: Tensor) -> Tensor | None:
        """One token per cache row: ``tokens`` [batch] at slots ``slots`` [batch]; attends to the slots
        ``key_ok`` [batch, slots] marks (the caller marks the slots written now and none after a row's
        newest token). The gathered logits [batch, padded vocab] on the last stage, None on the others;
        with a CUDA graph, the graph's output buffer (valid until the next ``decode``)."""
        if self.graph is not None:
            for buffer, value in zip(self.graph_inputs, (tokens, slots, key_ok)):
                buffer.copy_(value)
            self.graph.replay()
            return self.graph_logits
        return self._decode(tokens, slots, key_ok, int(slots.max()) + 1)

    @torch.no_grad()
    def _capture(self) -> None:
        """Record ``_decode`` over all cache slots into ``self.graph`` (see the module docstring)."""
        b, dev = self.batch, self.device
        tokens = torch.zeros(b, dtype=torch.long, device=dev)
        slots = torch.zeros(b, dtype=torch.long, device=dev)
        key_ok = torch.zeros(b, self.slots, dtype=torch.bool, device=dev)
        key_ok[:, 0] = True  # the warm-up attends to the slot it writes: finite values in the cache
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode(tokens, slots, key_ok, self.slots)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._decode(tokens, slots, key_ok, self.slots)
        for cache in (*self.keys, *self.values):
            cache.zero_()
        self.graph, self.graph_inputs, self.graph_logits = graph, (tokens, slots, key_ok), logits

    def _decode(self, tokens: Tensor, slots: Tensor, key_ok: Tensor, end: int) -> Tensor | None:
        """``decode`` attending to cache slots ``0:end`` (no host synchronisation: graph-capturable)."""
        allowed = key_ok[:, None, None, :end]  # a view: no per-step mask
        masks = {None: allowed}
        for w in set(self.windows) - {None}:
            keys = torch.arange(end, device=self.device)
            masks[w] = allowed & (keys[None, None, None, :] >= slots[:, None, None, None] - w)
        rows = torch.arange(self.batch, device=self.device)
        with self._packed_gemms():
            hidden = self._run(tokens[:, None], slots[:, None], slots[None, :], (rows, slots), masks, end)
        if hidden is None:
            return None
        return self._logits(self.gpt.decoder.final_layernorm(hidden[0]), self.packed_output).contiguous()

    @contextlib.contextmanager
    def _packed_gemms(self):
        """The layers' linear modules answered by their ``PackedLinear`` while the block runs: set in each
        owner's instance ``__dict__``, which attribute lookup reads before ``nn.Module``'s registry, so
        the modules, their parameters and state dicts are untouched; removed again on exit."""
        if self.packed is None:
            yield
            return
        shadowed = []
        try:
            for layer, packed in zip(self.layers, self.packed):
                for owner, name in _GEMMS:
                    module = getattr(layer, owner)
                    module.__dict__[name] = packed[name]
                    shadowed.append((module, name))
            yield
        finally:
            for module, name in shadowed:
                module.__dict__.pop(name, None)

    def _run(self, tokens, positions, rope_slots, write, masks, end) -> Tensor | None:
        """The layers of this stage on ``tokens`` [b, s] (embedded on the first stage, received from the
        previous one elsewhere); ``rope_slots`` [s, b] each token's RoPE position; ``write`` the cache
        (rows, slots) of the s*b tokens in [s, b] order; ``end``: attend to cache slots ``0:end`` (a
        decode step) or, None, to the packed sequence itself (a prefill). The output hidden states on the
        last stage; None elsewhere (sent on)."""
        s, b = tokens.shape[1], tokens.shape[0]
        if self.layout.is_first_stage:
            hidden = self.gpt.embedding(input_ids=tokens, position_ids=positions)  # [s, b, h]
        else:
            hidden = self._recv((s, b, self.hidden_size), self.config.params_dtype)
        freqs = None if self.freqs is None else self.freqs[rope_slots.reshape(-1)].view(s, b, 1, -1)
        for i, layer in enumerate(self.layers):
            hidden = self._layer(i, layer, hidden, freqs, write, masks[self.windows[i]], end)
        if not self.layout.is_last_stage:
            self._send(hidden)
            return None
        return hidden

    def _output_weight(self) -> Tensor:
        """The output layer's weight (the embedding's, when tied)."""
        if self.gpt.share_embeddings_and_output_weights:
            return self.gpt.shared_embedding_or_output_weight()
        return self.gpt.output_layer.weight

    def _logits(self, last: Tensor, packed: PackedLinear | None = None) -> Tensor:
        """The output layer's product, gathered over TP: [r, h] -> [r, padded vocab]; with ``packed``, its
        packed GEMM. Otherwise done in vocab slices of ``LOGIT_SLICE`` rows of the weight: each logit is
        the same dot product as in one matmul (bitwise the same on CPU), and at a few rows of hidden
        states the slices run 1.5x faster there."""
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        layer = self.gpt.output_layer
        if packed is not None:
            local = packed.product(last)
        else:
            weight = self._output_weight()
            local = torch.cat([torch.matmul(last, w.t()) for w in weight.split(LOGIT_SLICE)], dim=-1)
        if layer.bias is not None:
            local = local + layer.bias
        if self.layout.tp > 1:
            local = gather_from_tensor_model_parallel_region(local, group=layer.tp_group)
        return local

    def _layer(self, i, layer, hidden, freqs, write, allowed, end) -> Tensor:
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        attn = layer.self_attention
        residual = hidden
        query, key, value = attn.get_query_key_value_tensors(layer.input_layernorm(hidden), None)
        if freqs is not None:  # [s, b, heads, d]
            query = apply_rotary_pos_emb(query, freqs, config=self.config)
            key = apply_rotary_pos_emb(key, freqs, config=self.config)
        rows, slots = write
        self.keys[i][rows, :, slots] = key.flatten(0, 1)
        self.values[i][rows, :, slots] = value.flatten(0, 1)
        s, b = query.shape[0], query.shape[1]
        scale = attn.core_attention.softmax_scale
        if end is not None:
            # a decode step, one query per row over the cache: a group's query heads become its query
            # rows, so SDPA reads each cached key/value head once instead of once per query head
            k, v = self.keys[i][:, :, :end], self.values[i][:, :, :end]
            q = query[0].reshape(b, k.shape[1], -1, query.shape[-1])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
            context = out.reshape(1, b, -1)  # [1, b, hidden / tp]
        else:
            # a packed prefill (b == 1): the sequence attends to itself under the block-diagonal mask
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [1, heads, s, d]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
            )
            context = out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, 1, hidden / tp]
        projected = attn.linear_proj(context)
        hidden = layer.self_attn_bda(False, self.fusion)(projected, residual, layer.hidden_dropout)
        residual = hidden
        mlp_out = layer.mlp(layer.pre_mlp_layernorm(hidden))
        return layer.mlp_bda(False, self.fusion)(mlp_out, residual, layer.hidden_dropout)
