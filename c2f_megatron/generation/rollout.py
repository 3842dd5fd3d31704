"""KV-cached generation from a Megatron GPT model for left-padded prompt batches, on any TP/PP layout.

The PPO actor's rollouts and every evaluation's generations run here. Why not megatron's
``StaticInferenceEngine`` / ``TextGenerationController``: its static batch pads prompts on the *right* and
overwrites the pad slots token by token, has no hook to suppress ids at every step (the coarse actor must
never emit EOS), and treats top-k and top-p as exclusive; its ``StaticInferenceContext`` also re-applies
RoPE to the whole key cache at every step. So generation runs on ``generation.decode.KVDecoder`` (the
model's own modules, a post-RoPE KV cache, one token per row per step, activations sent between pipeline
stages over the layout's own process groups) and the sampled tokens are broadcast from the layout's last
stage (``engine.rows.share_from_last_stage``); sampling is ``generation.sampling``. Fine-mode generation
with continuous batching (finished rows leave, queued prompts take their cache rows) is
``generation.continuous``.

Layout and positions (the PPO trainer must use the same for its log-prob forward): ``RolloutBatch.tokens``
is ``[left pad | prompt | response | right pad]`` with the prompt block ``P`` wide. RoPE positions are the
slot indices 0..P+R-1 (megatron's RoPE ignores ``position_ids``), so real tokens are shifted by their row's
pad count; RoPE is relative, so this changes attention only by float rounding. The mask is causal plus
"key is padding" (``RolloutBatch.attention_mask()``). A full forward of ``tokens`` with that mask gives,
at slot ``P + j - 1``, the logits the sampler used for response token ``j``.

Parallel layout (a ``RoleLayout``, megatron's global one or a role's own): every TP rank holds the gathered
logits and the same seeded generator, so all draw the same token; TP rank 0's token is broadcast anyway so
the ranks cannot drift. With PP the last stage samples and broadcasts tokens and log-probs to the other
stages. Sequence parallelism is turned off while decoding (``generation_mode``). Interleaved (virtual)
pipelines, the Transformer Engine attention (it ignores an explicit padding mask under a causal mask type)
and what ``decode.check_decodable`` lists are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from c2f_megatron.engine.rows import share_from_last_stage
from c2f_megatron.generation.decode import KVDecoder
from c2f_megatron.generation.sampling import process_logits, sample_tokens
from c2f_megatron.platform.role_layout import RoleLayout


@dataclass
class GenerationConfig:
    """How one rollout batch is sampled; rebuild (``dataclasses.replace``) each PPO iteration to change
    ``max_new_tokens`` as the length controller asks.

    ``suppress_ids`` can never be sampled (coarse mode: EOS and the configured stop ids, so the draft runs
    to ``max_new_tokens``); ``stop_ids`` end a sequence when sampled (fine mode), the stop token included
    in the response. Trailing ids of either list are stripped from the prompts before generation.
    ``seed`` is offset by the data-parallel rank (or by the row, see ``generate``'s ``row_offset``) so that
    DP replicas draw different samples.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    suppress_ids: list[int] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    pad_id: int = 0
    seed: int = 0
    # None: no report; k >= 0: ``on_step`` also gets each sampled token's log-prob under the model's own
    # distribution (before temperature and filters) and the k most likely ids with theirs (OpenAI logprobs)
    top_logprobs: int | None = None
    # GPU: replay each decode step from a CUDA graph (``decode.KVDecoder``); one pipeline stage only
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            problems.append(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_logprobs is not None and self.top_logprobs < 0:
            problems.append(f"top_logprobs must be >= 0 or None, got {self.top_logprobs}")
        both = sorted(set(self.suppress_ids) & set(self.stop_ids))
        if both:
            problems.append(f"ids {both} are both suppressed and stop ids: a suppressed id can never stop")
        if problems:
            raise ValueError("invalid generation config: " + "; ".join(problems))


def fine_generation_config(
    eos_id: int, pad_id: int, max_new_tokens: int, extra_stop_ids: tuple[int, ...] = (), **kwargs
) -> GenerationConfig:
    """Fine actor / evaluation: a sequence ends at EOS or at any extra stop id."""
    return GenerationConfig(max_new_tokens, stop_ids=[eos_id, *extra_stop_ids], pad_id=pad_id, **kwargs)


@dataclass
class RolloutBatch:
    """What the rollout hands to the PPO experience maker; identical on every TP/PP rank.

    ``tokens`` [b, P+R] long: left-padded prompts (P = longest prompt) then responses right-padded with
    ``pad_id``; ``prompt_mask`` [b, P] bool: real prompt tokens; ``response_mask`` [b, R] bool: generated
    tokens up to and including the stop token; ``response_lengths`` [b] long; ``hit_limit`` [b] bool: the
    sequence was cut by ``max_new_tokens`` (never sampled a stop id; always true in coarse mode);
    ``logprobs`` [b, R] float32: log-prob of each sampled token under the distribution it was drawn from
    (after suppression, temperature, top-k/top-p; greedy: suppression only), 0 outside ``response_mask``.
    """

    tokens: Tensor
    prompt_mask: Tensor
    response_mask: Tensor
    response_lengths: Tensor
    hit_limit: Tensor
    logprobs: Tensor

    @property
    def prompt_width(self) -> int:
        """P: the response of every row starts at this column of ``tokens``."""
        return self.prompt_mask.shape[1]

    @property
    def responses(self) -> Tensor:
        """[b, R] response block of ``tokens`` (pad after each response ends)."""
        return self.tokens[:, self.prompt_width :]

    def sequence_mask(self) -> Tensor:
        """[b, P+R] bool: real (prompt or response) tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def attention_mask(self) -> Tensor:
        """[b, 1, S, S] bool, True = masked: causal plus padding keys; the mask the sampler used."""
        return padded_causal_mask(~self.sequence_mask())

    def response_ids(self) -> list[list[int]]:
        """Each row's response ids (stop token included, if any), e.g. for decoding and the reward model."""
        return [row[:n].tolist() for row, n in zip(self.responses, self.response_lengths.tolist())]

    def to(self, device: torch.device | str) -> RolloutBatch:
        return RolloutBatch(**{k: v.to(device) for k, v in vars(self).items()})


def padded_causal_mask(key_is_pad: Tensor, query_start: int = 0, query_end: int | None = None) -> Tensor:
    """Megatron's boolean mask (True = masked) [b, 1, q, k] for queries ``query_start:query_end`` over
    keys ``0:query_end`` of a left-padded batch: a query sees itself and earlier non-padding slots."""
    end = key_is_pad.shape[1] if query_end is None else query_end
    q = torch.arange(query_start, end, device=key_is_pad.device)
    k = torch.arange(end, device=key_is_pad.device)
    future = k[None, :] > q[:, None]  # [q, k]
    return future[None, None] | key_is_pad[:, None, None, :end]


def _check_supported(model: torch.nn.Module) -> None:
    from megatron.core.utils import get_model_config

    if isinstance(model, (list, tuple)):
        raise ValueError(
            "generate() needs one model chunk; interleaved (virtual) pipeline models are not supported for "
            "rollout: build the actor without virtual_pipeline_model_parallel_size"
        )
    get_model_config(model)  # a megatron model
    for name, module in model.named_modules():
        if name.endswith("core_attention") and "transformer_engine" in type(module).__module__:
            raise ValueError(
                "generate() needs the 'sdpa' or 'local' layer spec: Transformer Engine attention ignores the "
                "left-padding mask under a causal mask type, which would corrupt padded rows"
            )


def _max_sequence_length(model: torch.nn.Module) -> int:
    from megatron.core.utils import get_attr_wrapped_model

    return int(get_attr_wrapped_model(model, "max_sequence_length"))


def _left_pad(
    prompts: list[list[int]], pad_id: int, width: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for i, ids in enumerate(prompts):
        if ids:
            tokens[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long, device=device)
            real[i, width - len(ids) :] = True
    return tokens, real


def _strip_trailing(ids: list[int], drop: set[int]) -> list[int]:
    end = len(ids)
    while end and ids[end - 1] in drop:
        end -= 1
    return list(ids[:end])


def _sampling_generator(
    seed: int,
    device: torch.device,
    rows: int,
    row_offset: int | None,
    dp_rank: int,
    row_seeds: list[int] | None = None,
) -> torch.Generator | list[torch.Generator]:
    """One generator seeded with ``seed + DP rank`` or, given ``row_offset``, one per row seeded by the
    row's index in the whole batch (draws then do not depend on how the batch is split over DP ranks), or
    one per row seeded with ``row_seeds`` (a request's own seed, whatever batch it shares)."""
    if row_seeds is not None:
        if len(row_seeds) != rows:
            raise ValueError(f"{len(row_seeds)} row seeds for {rows} prompts")
        return [torch.Generator(device=device).manual_seed(s) for s in row_seeds]
    if row_offset is not None:
        return [
            torch.Generator(device=device).manual_seed((seed << 20) + row_offset + i) for i in range(rows)
        ]
    return torch.Generator(device=device).manual_seed(seed + dp_rank)


# ``stop_when`` sees at most this many of a row's latest response ids (stop strings are a few tokens long).
STOP_WINDOW = 16


@dataclass
class StepTokens:
    """What ``generate``'s ``on_step`` sees after each step, the same on every rank.

    ``tokens[i]`` is row i's new id (``pad_id`` once the row is done) and ``active[i]`` whether the row
    produced it. With ``GenerationConfig.top_logprobs`` set, ``logprobs[i]`` is that id's log-prob under
    the model's own distribution (before temperature and filters) and ``top_ids[i]`` / ``top_logprobs[i]``
    the ``top_logprobs`` most likely ids and theirs; otherwise they are None.
    """

    step: int
    tokens: list[int]
    active: list[bool]
    logprobs: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    layout: RoleLayout,
    prompts: list[list[int]],
    gen_cfg: GenerationConfig,
    true_vocab_size: int,
    row_offset: int | None = None,
    stop_when: Callable[[list[int]], bool] | None = None,
    on_step: Callable[[StepTokens], Iterable[int]] | None = None,
    row_seeds: list[int] | None = None,
) -> RolloutBatch:
    """Sample up to ``gen_cfg.max_new_tokens`` tokens for each prompt with a KV cache; call on every rank
    of ``layout``'s TP/PP group (the groups ``model`` was built on) with the same prompts. The model's
    train/eval mode is restored after.

    ``row_offset``: the index of ``prompts[0]`` in the whole (all-DP-ranks) batch; given, every row draws
    from its own generator (seeded by ``gen_cfg.seed`` and its index). Without it, one generator per rank.
    ``stop_when(ids)``: called after each step with an unfinished row's latest response ids (at most
    ``STOP_WINDOW``); True ends that row there, as a stop id would (evaluation's stop strings). Every rank
    holds the same tokens, so every rank decides alike.
    ``on_step(StepTokens)``: called after each step on every rank (a server streams from it on rank 0);
    it returns the rows to end there (a request's own token limit or stop string), which must depend on
    the tokens only, so that every rank returns the same. ``row_seeds``: one generator per row with that
    seed (instead of ``gen_cfg.seed``), so a request's draws do not depend on the rows beside it.
    """
    prompts = check_prompts(model, prompts, gen_cfg, true_vocab_size)
    with generation_mode(model):
        return _generate(
            model, layout, prompts, gen_cfg, true_vocab_size, row_offset, stop_when, on_step, row_seeds
        )


def check_prompts(
    model: torch.nn.Module, prompts: list[list[int]], gen_cfg: GenerationConfig, true_vocab_size: int
) -> list[list[int]]:
    """The prompts with trailing stop and suppressed ids stripped; refuses a model generation cannot run
    on, an empty prompt, ids outside the vocabulary, or a prompt too long for ``max_new_tokens``."""
    _check_supported(model)
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    drop = set(gen_cfg.suppress_ids) | set(gen_cfg.stop_ids)
    prompts = [_strip_trailing(list(p), drop) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty (after stripping trailing stop/suppressed ids)")
        if min(p) < 0 or max(p) >= true_vocab_size:
            raise ValueError(f"prompt {i} has ids outside [0, {true_vocab_size})")
    width, new = max(len(p) for p in prompts), gen_cfg.max_new_tokens
    if width + new > _max_sequence_length(model):
        raise ValueError(
            f"longest prompt ({width}) + max_new_tokens ({new}) = {width + new} exceeds the model's "
            f"max_position_embeddings ({_max_sequence_length(model)})"
        )
    return prompts


@contextlib.contextmanager
def generation_mode(model: torch.nn.Module):
    """The model in eval mode with sequence parallelism off for the block, both restored after: a decode
    step has one token, which cannot split over TP (megatron's inference turns SP off the same way,
    ``set_model_to_sequence_parallel``)."""
    from megatron.core.utils import get_model_config

    was_training = model.training
    sequence_parallel = get_model_config(model).sequence_parallel
    model.eval()
    if sequence_parallel:
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        set_model_to_sequence_parallel(model, False)
    try:
        yield
    finally:
        if sequence_parallel:
            set_model_to_sequence_parallel(model, True)
        model.train(was_training)


def _generate(
    model: torch.nn.Module,
    layout: RoleLayout,
    prompts: list[list[int]],
    gen_cfg: GenerationConfig,
    true_vocab_size: int,
    row_offset: int | None,
    stop_when: Callable[[list[int]], bool] | None,
    on_step: Callable[[StepTokens], Iterable[int]] | None,
    row_seeds: list[int] | None,
) -> RolloutBatch:
    device = next(model.parameters()).device
    b, width, new = len(prompts), max(len(p) for p in prompts), gen_cfg.max_new_tokens
    total = width + new

    prompt_tokens, prompt_mask = _left_pad(prompts, gen_cfg.pad_id, width, device)
    tokens = torch.full((b, total), gen_cfg.pad_id, dtype=torch.long, device=device)
    tokens[:, :width] = prompt_tokens
    key_ok = torch.zeros((b, total), dtype=torch.bool, device=device)  # slots holding real tokens so far
    key_ok[:, :width] = prompt_mask
    stop_ids = torch.tensor(gen_cfg.stop_ids, dtype=torch.long, device=device)

    decoder = KVDecoder(model, layout, b, total, cuda_graph=gen_cfg.cuda_graph)
    generator = _sampling_generator(gen_cfg.seed, device, b, row_offset, layout.dp_rank, row_seeds)
    k_top = gen_cfg.top_logprobs
    message_rows = 2 if k_top is None else 3 + 2 * k_top
    last_stage = layout.is_last_stage

    done = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    logprobs = torch.zeros((b, new), dtype=torch.float32, device=device)
    slot = torch.zeros(b, dtype=torch.long, device=device)
    start, end = 0, width  # prefill the prompts, then one slot per step
    for step in range(new):
        if step == 0:  # the prompts packed, without their left padding
            logits = decoder.prefill(prompts, list(range(b)), [width - len(p) for p in prompts])
        else:
            logits = decoder.decode(tokens[:, start], slot.fill_(start), key_ok)
        sampled = None
        if last_stage:
            processed = process_logits(
                logits,
                true_vocab_size,
                gen_cfg.suppress_ids,
                gen_cfg.temperature,
                gen_cfg.top_k,
                gen_cfg.top_p,
                gen_cfg.greedy,
            )
            next_tokens, next_logprobs = sample_tokens(processed, gen_cfg.greedy, generator)
            # one float64 message per step: token ids (< 2**53, exact) and their log-probs
            parts = [next_tokens.double()[None], next_logprobs.double()[None]]
            if k_top is not None:
                raw = torch.log_softmax(logits[:, :true_vocab_size].double(), dim=-1)
                top = raw.topk(k_top, dim=-1)
                parts += [raw.gather(-1, next_tokens[:, None]).T, top.indices.double().T, top.values.T]
            sampled = torch.cat(parts)
        sampled = share_from_last_stage(sampled, [message_rows, b], torch.float64, layout, over_tp=True)
        next_tokens, next_logprobs = sampled[0].long(), sampled[1].float()

        active = ~done
        tokens[:, end] = torch.where(active, next_tokens, gen_cfg.pad_id)
        logprobs[:, step] = torch.where(active, next_logprobs, 0.0)
        lengths += active.long()
        done |= active & torch.isin(next_tokens, stop_ids)
        if stop_when is not None:
            recent = tokens[:, max(width, end + 1 - STOP_WINDOW) : end + 1].tolist()
            for i in (~done).nonzero().flatten().tolist():
                if stop_when(recent[i]):
                    done[i] = True
        if on_step is not None:
            report = StepTokens(step, tokens[:, end].tolist(), active.tolist())
            if k_top is not None:
                report.logprobs = sampled[2].tolist()
                report.top_ids = sampled[3 : 3 + k_top].T.long().tolist()
                report.top_logprobs = sampled[3 + k_top :].T.tolist()
            for i in on_step(report):
                done[i] = True
        start, end = end, end + 1
        key_ok[:, start] = True  # the token just sampled is the next step's input
        if bool(done.all()):
            break

    steps = torch.arange(new, device=device)
    response_mask = steps[None, :] < lengths[:, None]
    return RolloutBatch(
        tokens=tokens,
        prompt_mask=prompt_mask,
        response_mask=response_mask,
        response_lengths=lengths,
        hit_limit=~done,
        logprobs=logprobs,
    )
