"""Rollout checks on a tiny model at one TP/PP layout; rank 0 prints ``RESULT <json>`` (the test asserts).

Checks: KV-cached greedy == greedy by full recomputation on the same left-padded layout (also with a sliding
window shorter than the sequence); each row of a padded batch == that prompt generated alone; at TP=PP=1 a
plain full forward with ``RolloutBatch.attention_mask()`` reproduces the sampler's log-probs (the trainer's
layout); coarse mode never samples EOS / stop ids / padded-vocab ids although unsuppressed sampling does;
fine-mode stop ids end a row while the others go on; ``max_new_tokens`` and ``hit_limit``.

    python tests/workers/rollout_checks.py                       # TP1
    torchrun --nproc_per_node=2 tests/workers/rollout_checks.py --tp 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from c2f_megatron.generation.continuous import generate_continuous
from c2f_megatron.generation.rollout import GenerationConfig, generate, padded_causal_mask
from c2f_megatron.generation.sampling import process_logits
from c2f_megatron.models import ModelConfig, build_gpt_model
from c2f_megatron.platform import ParallelConfig, init_distributed
from c2f_megatron.platform.role_layout import global_layout

VOCAB = 300  # padded to 384 (TP1) / 512 (TP2): the padded rows are random and must never be sampled
EOS, STOP = 2, 7
CFG = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    layer_spec="sdpa",
)


def make_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def full_last_logits(
    model, tokens: torch.Tensor, key_is_pad: torch.Tensor, padded_vocab: int
) -> torch.Tensor:
    """Last-slot logits of a full forward (no cache reuse: a fresh context each call), on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.inference.communication_utils import broadcast_from_last_pipeline_stage
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
        InferenceWrapperConfig,
    )

    b, s = tokens.shape
    wrapper = GPTInferenceWrapper(
        model,
        InferenceWrapperConfig(
            hidden_size=CFG.hidden_size,
            params_dtype=torch.float32,
            inference_batch_times_seqlen_threshold=-1,
            padded_vocab_size=padded_vocab,
        ),
        StaticInferenceContext(b, s),
    )
    wrapper.prep_model_for_inference()
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    logits = wrapper.run_one_forward_step(
        {"tokens": tokens, "position_ids": positions, "attention_mask": padded_causal_mask(key_is_pad)}
    )
    if ps.get_pipeline_model_parallel_world_size() > 1:
        last = None if logits is None else logits[:, -1, :].contiguous()
        return broadcast_from_last_pipeline_stage([b, padded_vocab], torch.float32, last)
    return logits[:, -1, :]


def recompute_greedy(model, batch, n: int, padded_vocab: int) -> torch.Tensor:
    """Greedy continuation of ``batch``'s prompts by recomputing the whole padded sequence every step."""
    tokens = batch.tokens[:, : batch.prompt_width]
    key_is_pad = ~batch.prompt_mask
    for _ in range(n):
        logits = full_last_logits(model, tokens, key_is_pad, padded_vocab)
        nxt = process_logits(logits, VOCAB, greedy=True).argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        key_is_pad = torch.cat([key_is_pad, torch.zeros_like(key_is_pad[:, :1])], dim=1)
    return tokens[:, batch.prompt_width :]


def trainer_logprob_gap(model, batch) -> tuple[float, bool]:
    """Max |log-prob| gap between the sampler and a plain full forward on the trainer's layout."""
    positions = torch.arange(batch.tokens.shape[1]).unsqueeze(0).expand_as(batch.tokens)
    with torch.no_grad():
        logits = model(batch.tokens, positions, batch.attention_mask(), runtime_gather_output=True)
    p = batch.prompt_width
    step_logits = logits[:, p - 1 : -1, :]  # slot P+j-1 predicts response token j
    processed = process_logits(step_logits, VOCAB, greedy=True)
    logp = torch.log_softmax(processed, -1).gather(-1, batch.responses.unsqueeze(-1)).squeeze(-1)
    gap = (logp - batch.logprobs).abs()[batch.response_mask].max().item()
    argmax_ok = bool((processed.argmax(-1) == batch.responses)[batch.response_mask].all())
    return gap, argmax_ok


@torch.no_grad()
def packed_gemm_check(model, layout, prompts: list[list[int]]) -> dict[str, object]:
    """Decode steps with the GEMMs on packed weights (``PackedLinear``) against the modules' own: the
    largest logit difference over 4 steps relative to the largest logit, whether packing is on by default
    here, and whether the modules are back in place afterwards (nothing left shadowing them)."""
    from c2f_megatron.generation.decode import _GEMMS, KVDecoder, packed_gemm_available

    b, width = len(prompts), max(map(len, prompts))
    slots = width + 4
    starts = [width - len(p) for p in prompts]
    key_ok = torch.zeros(b, slots, dtype=torch.bool)
    for i, st in enumerate(starts):
        key_ok[i, st:width] = True
    decoders = [KVDecoder(model, layout, b, slots, packed=flag) for flag in (True, False)]
    logits = [d.prefill(prompts, list(range(b)), starts) for d in decoders]
    gap, scale = 0.0, 0.0
    tokens = torch.arange(10, 10 + b)
    for step in range(4):
        key_ok[:, width + step] = True
        slot = torch.full((b,), width + step, dtype=torch.long)
        logits = [d.decode(tokens, slot, key_ok) for d in decoders]
        if logits[0] is not None:
            gap = max(gap, float((logits[0] - logits[1]).abs().max()))
            scale = max(scale, float(logits[1].abs().max()))
        tokens = tokens + 1
    layer = decoders[0].layers[0]
    restored = all(name not in getattr(layer, owner).__dict__ for owner, name in _GEMMS)
    return {
        "gap": gap / max(scale, 1e-30) if logits[0] is not None else 0.0,
        "default_on": KVDecoder(model, layout, b, slots).packed is not None,
        "available": packed_gemm_available(model),
        "restored": restored,
    }


def refuses(call, message: str) -> bool:
    """True when ``call`` raises a ValueError mentioning ``message``."""
    try:
        call()
    except ValueError as err:
        return message in str(err)
    return False


def scale_vocab_rows(model, ids: list[int], factor: float) -> None:
    """Make the given ids' logits huge in magnitude (on the TP rank that holds each row)."""
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return
    weight = model.output_layer.weight
    start = ps.get_tensor_model_parallel_rank() * weight.shape[0]
    with torch.no_grad():
        for i in ids:
            if start <= i < start + weight.shape[0]:
                weight[i - start] *= factor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    init_distributed(ParallelConfig(args.tp, args.pp, seed=11))
    solo = args.tp == 1 and args.pp == 1
    padded = CFG.padded_vocab_size(args.tp)
    out: dict[str, object] = {}

    model = build_gpt_model(CFG)
    model.eval()
    layout = global_layout()
    prompts = make_prompts([5, 9, 3, 12], seed=0)
    greedy = GenerationConfig(max_new_tokens=12, greedy=True, pad_id=0)
    batch = generate(model, layout, prompts, greedy, VOCAB)
    ref = recompute_greedy(model, batch, greedy.max_new_tokens, padded)
    out["greedy_equal"] = bool(torch.equal(batch.responses, ref))
    out["greedy_mismatches"] = int((batch.responses != ref).sum())
    out["per_prompt_equal"] = all(
        torch.equal(generate(model, layout, [p], greedy, VOCAB).responses[0], batch.responses[i])
        for i, p in enumerate(prompts)
    )
    if solo:
        out["trainer_logprob_gap"], out["trainer_argmax_equal"] = trainer_logprob_gap(model, batch)
        model.train()
        generate(model, layout, prompts, dataclasses.replace(greedy, max_new_tokens=2), VOCAB)
        out["train_mode_restored"] = model.training
        model.eval()

        out["refusals"] = [
            refuses(lambda: generate([model], layout, prompts, greedy, VOCAB), "interleaved"),
            refuses(lambda: generate(model, layout, [[1] * 510], greedy, VOCAB), "max_position_embeddings"),
            refuses(lambda: generate(model, layout, [[VOCAB]], greedy, VOCAB), "outside"),
            refuses(
                lambda: generate(model, layout, [[2, 2]], dataclasses.replace(greedy, stop_ids=[2]), VOCAB),
                "empty",
            ),
        ]

        windowed_cfg = dataclasses.replace(CFG, sliding_window=6)
        windowed = build_gpt_model(windowed_cfg)
        windowed.eval()
        wbatch = generate(windowed, layout, prompts, greedy, VOCAB)
        out["window_greedy_equal"] = bool(
            torch.equal(wbatch.responses, recompute_greedy(windowed, wbatch, greedy.max_new_tokens, padded))
        )

    out["packed_gemm"] = packed_gemm_check(model, layout, prompts)
    out["device"] = next(model.parameters()).device.type
    if out["device"] == "cpu" and solo:
        graphed = dataclasses.replace(greedy, cuda_graph=True)
        out["cuda_graph_refused"] = refuses(
            lambda: generate(model, layout, prompts, graphed, VOCAB), "cuda_graph"
        )
    if out["device"] == "cuda" and args.pp == 1:
        # CUDA-graph decode steps against eager ones: greedy and seeded sampling, plain and continuous
        graphed = dataclasses.replace(greedy, cuda_graph=True)
        out["cuda_graph_greedy_equal"] = bool(
            torch.equal(generate(model, layout, prompts, graphed, VOCAB).responses, batch.responses)
        )
        drawn = dataclasses.replace(greedy, greedy=False, temperature=1.0, top_k=20, seed=6)
        eager = generate(model, layout, prompts, drawn, VOCAB).responses
        replayed = generate(model, layout, prompts, dataclasses.replace(drawn, cuda_graph=True), VOCAB)
        out["cuda_graph_sampled_equal"] = bool(torch.equal(eager, replayed.responses))
        out["cuda_graph_continuous_equal"] = generate_continuous(
            model, layout, prompts, graphed, VOCAB, max_batch=2
        ) == generate_continuous(model, layout, prompts, greedy, VOCAB, max_batch=2)

    # Continuous batching: 7 prompts through 3 cache rows, a stop id ending some rows early (their slots
    # take the next prompts): every response equals its prompt generated alone; samples do not depend on
    # how many rows decode at once.
    many = make_prompts([5, 9, 3, 12, 7, 4, 10], seed=3)
    fine_cfg = dataclasses.replace(
        greedy, stop_ids=[int(generate(model, layout, many, greedy, VOCAB).responses[0, 3])]
    )
    continuous = generate_continuous(model, layout, many, fine_cfg, VOCAB, max_batch=3)
    alone = [generate(model, layout, [p], fine_cfg, VOCAB).response_ids()[0] for p in many]
    out["continuous_equal_alone"] = continuous == alone
    out["continuous_lengths"] = [len(r) for r in continuous]
    drawn = dataclasses.replace(fine_cfg, greedy=False, temperature=1.0, top_k=20, seed=4)
    out["continuous_sampling_batch_free"] = generate_continuous(
        model, layout, many, drawn, VOCAB, max_batch=2
    ) == generate_continuous(model, layout, many, drawn, VOCAB, max_batch=7)

    if args.pp == 1:
        # Fine mode: stop at the token row 0 produced at step 3; rows end at their first occurrence of it.
        stop = int(batch.responses[0, 3])
        fine = generate(model, layout, prompts, dataclasses.replace(greedy, stop_ids=[stop]), VOCAB)
        expected_len = []
        for row in batch.responses.tolist():
            expected_len.append(row.index(stop) + 1 if stop in row else len(row))
        out["stop_lengths"] = fine.response_lengths.tolist()
        out["stop_expected_lengths"] = expected_len
        mask_ok = all(
            fine.response_mask[i, :n].all() and not fine.response_mask[i, n:].any()
            for i, n in enumerate(expected_len)
        )
        prefix_ok = all(
            torch.equal(fine.responses[i, :n], batch.responses[i, :n]) for i, n in enumerate(expected_len)
        )
        pads_ok = all(bool((fine.responses[i, n:] == 0).all()) for i, n in enumerate(expected_len))
        out["stop_mask_ok"] = bool(mask_ok and prefix_ok and pads_ok)
        out["stop_hit_limit"] = fine.hit_limit.tolist()
        out["stop_width"] = fine.responses.shape[1]

        # Coarse mode: EOS and STOP made very likely by scaling their output rows, then suppressed.
        scale_vocab_rows(model, [EOS, STOP], 60.0)
        sampled = dict(temperature=1.0, top_k=50, top_p=0.95, pad_id=0, seed=5)
        few = make_prompts([4, 7] * 4, seed=1)
        free = generate(model, layout, few, GenerationConfig(16, **sampled), VOCAB)
        free_tokens = free.responses[free.response_mask]
        out["free_eos_fraction"] = float(torch.isin(free_tokens, torch.tensor([EOS, STOP])).float().mean())
        coarse_cfg = GenerationConfig(96, suppress_ids=[EOS, STOP], **sampled)
        coarse = generate(model, layout, make_prompts([4, 7] * 16, seed=2), coarse_cfg, VOCAB)
        coarse_tokens = coarse.responses[coarse.response_mask]
        out["coarse_count"] = int(coarse_tokens.numel())
        banned = torch.isin(coarse_tokens, torch.tensor([EOS, STOP])) | (coarse_tokens >= VOCAB)
        out["coarse_bad"] = int(banned.sum())
        out["coarse_all_hit_limit"] = bool(coarse.hit_limit.all())
        out["coarse_distinct"] = int(coarse_tokens.unique().numel())
        again = generate(model, layout, few, GenerationConfig(16, **sampled), VOCAB)
        out["sampling_reproducible"] = bool(torch.equal(again.tokens, free.tokens))

    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
