"""Checks of the Megatron eval backends on tiny random checkpoints (written by eval_make_ckpts.py).

Run under torchrun with any TP/PP (``OUT TP PP``): every rank runs the calls, rank 0 asserts.
- teacher-forced log-probs (full forward, right-padded batch) equal the log-probs the KV-cached greedy
  sampler (left-padded batch) recorded for the tokens it generated: two independent code paths;
- a request scores the same alone and batched with a longer one (padding is invisible);
- loglikelihood is the sum of the continuation's token log-probs; stop strings cut generated text and end
  the row's decoding there; single-token continuations sharing a context score as if alone;
- the reward scorer reads each sequence's own last token (alone == batched).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from c2f_megatron.data import load_tokenizer
from c2f_megatron.eval.lm import split_request
from c2f_megatron.eval.megatron_model import MegatronLM, RewardScorer
from c2f_megatron.generation.rollout import fine_generation_config, generate
from c2f_megatron.platform.distributed import ParallelConfig, init_distributed, is_rank_zero


def main(out: Path, tp: int, pp: int) -> None:
    init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    tok = load_tokenizer()
    lm = MegatronLM.from_checkpoint(out / "lm", tok, batch_size=4)
    texts = ["\n\nHuman: How do I bake bread?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:", "Paris is the"]
    prompts = [tok.encode(t, add_bos=True) for t in texts]

    cfg = fine_generation_config(tok.eos_id, tok.pad_id, 10, greedy=True)
    batch = generate(lm.chunk, lm.role.layout, prompts, cfg, tok.vocab_size)
    responses = batch.response_ids()
    sampled = [batch.logprobs[i, : len(r)].tolist() for i, r in enumerate(responses)]
    forced = lm.token_logprobs(prompts, responses)
    assert responses == lm.generate_ids(prompts, 10), "generate_ids differs from the rollout it wraps"

    alone = lm.token_logprobs(prompts[2:], responses[2:])[0]
    ll = lm.loglikelihood([(texts[1], " Hello there"), (texts[0], " Knead the dough.")])
    ctx, cont = split_request(tok, texts[1], " Hello there")
    ll_direct = sum(lm.token_logprobs([ctx], [cont])[0])
    text = lm.generate([texts[0]], 10, [tok.decode(responses[0][2:4])])[0]
    stopped = lm.generate_ids([prompts[0]], 10, stop=[tok.decode(responses[0][2:4])])[0]
    # single-token continuations of one context share a forward; each still scores as if alone
    letters = [([*prompts[2]], [responses[2][0]]), ([*prompts[2]], [responses[1][0]])]
    shared = lm.token_logprobs([c for c, _ in letters], [x for _, x in letters])
    single = [lm.token_logprobs([c], [x])[0] for c, x in letters]

    rm = RewardScorer.from_checkpoint(out / "rm", tok, batch_size=4)
    seqs = [p + r for p, r in zip(prompts, responses)]
    together = rm.score(seqs)
    separate = [rm.score([s])[0] for s in seqs]
    if not is_rank_zero():
        return
    for f, s in zip(forced, sampled):
        assert len(f) == len(s) > 0
        torch.testing.assert_close(torch.tensor(f), torch.tensor(s), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(alone), torch.tensor(forced[2]), atol=1e-5, rtol=1e-5)
    assert all(x < 0 for x in ll), ll
    assert abs(ll[0] - ll_direct) < 1e-4, (ll, ll_direct)
    assert tok.decode(responses[0][2:4]) not in text and len(text) < len(tok.decode(responses[0]))
    assert stopped == responses[0][: len(stopped)] and 3 <= len(stopped) < len(responses[0]), stopped
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(single), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(together), torch.tensor(separate), atol=1e-5, rtol=1e-5)
    assert len(set(round(x, 6) for x in together)) == len(together), together
    print("EVAL_MODEL_CHECKS_OK", tp, pp)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
