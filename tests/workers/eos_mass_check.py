"""torchrun worker (2 ranks): the actor's log-prob pass over a 2-way vocab split gives the EOS mass, the
log-probs and the entropy of the unsharded reference (``tests/test_ppo_observability.py``), with a
suppressed id on each rank's slice and padded vocab on the last."""

import torch
import torch.distributed as dist

from c2f_megatron.rl.workers import response_logprobs
from tests.test_ppo_observability import SUPPRESSED, TRUE_VOCAB, layout, reference, toy_batch


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logits, mb = toy_batch(padded_vocab=64)
    width = logits.shape[-1] // world
    local = logits[..., rank * width : (rank + 1) * width].clone()
    tp = layout(tp=world, rank=rank, group=dist.group.WORLD)
    out = response_logprobs(
        mb.output_rows(local), mb, tp, TRUE_VOCAB, SUPPRESSED, 0.7, with_entropy=True, with_eos_mass=True
    )
    single = response_logprobs(
        mb.output_rows(logits), mb, layout(), TRUE_VOCAB, SUPPRESSED, 0.7, with_entropy=True
    )
    expected = reference(logits, mb, 0.7)
    valid = mb.response_mask
    assert torch.allclose(out["eos_mass"], expected, atol=1e-6, rtol=1e-5), (
        (out["eos_mass"] - expected).abs().max()
    )
    assert torch.allclose(out["logprobs"], single["logprobs"], atol=1e-5)
    assert torch.allclose(out["entropy"][valid], single["entropy"][valid], atol=1e-5)
    dist.destroy_process_group()
    print("eos mass ok", rank)


if __name__ == "__main__":
    main()
