"""torchrun worker: ``vocab_parallel_logprobs`` / ``vocab_parallel_entropy`` over a 2-way vocab split equal
the unsharded ``log_softmax`` (values and gradients), with -inf columns on both ranks."""

import torch
import torch.distributed as dist

from c2f_megatron.rl.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    vocab = 10 * world
    full = torch.randn(3, 5, vocab, generator=gen, dtype=torch.float64) * 3
    full[..., 3] = float("-inf")  # a suppressed id on rank 0's slice
    full[..., vocab - 1] = float("-inf")  # a padded id on the last rank's slice
    labels = torch.randint(0, vocab - 1, (3, 5), generator=gen)
    labels[labels == 3] = 4
    upstream = torch.randn(3, 5, generator=gen, dtype=torch.float64)

    ref_in = full.clone().requires_grad_(True)
    ref = torch.log_softmax(ref_in, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (ref * upstream).sum().backward()
    p = torch.softmax(full, -1)
    ref_entropy = -(torch.where(p > 0, p * torch.log_softmax(full, -1), 0.0)).sum(-1)

    width = vocab // world
    local = full[..., rank * width : (rank + 1) * width].clone().requires_grad_(True)
    logp = vocab_parallel_logprobs(local, labels, rank * width, dist.group.WORLD)
    (logp * upstream).sum().backward()
    entropy = vocab_parallel_entropy(local.detach(), dist.group.WORLD)

    assert torch.allclose(logp.double(), ref, atol=1e-5), (logp - ref).abs().max()
    grad_ref = ref_in.grad[..., rank * width : (rank + 1) * width]
    assert torch.allclose(local.grad.double(), grad_ref, atol=1e-5), (local.grad - grad_ref).abs().max()
    assert torch.allclose(entropy.double(), ref_entropy, atol=1e-5), (entropy - ref_entropy).abs().max()
    dist.destroy_process_group()
    print("vocab-parallel ok", rank)


if __name__ == "__main__":
    main()
