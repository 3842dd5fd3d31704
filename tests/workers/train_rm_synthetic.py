"""Reward model on a synthetic preference set with a learnable rule, through the shared trainer.

Pairs share a random prompt; the chosen response draws its tokens from the lower half of a 64-id vocab,
the rejected one from the upper half. Prints a JSON line with the final eval metrics.
"""

import json
import random
import sys

from c2f_megatron.platform.distributed import init_distributed
from c2f_megatron.training.config import ModelSection, OptimConfig, TrainConfig, TrainerSections
from c2f_megatron.training.tasks.reward import PairExample, RewardConfig, make_task
from c2f_megatron.training.trainer import run

VOCAB, SEQ = 64, 24


def make_pairs(n: int, rng: random.Random) -> list[PairExample]:
    pairs = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(4, 10))]
        good = [rng.randrange(3, VOCAB // 2) for _ in range(rng.randrange(3, 10))]
        bad = [rng.randrange(VOCAB // 2, VOCAB) for _ in range(rng.randrange(3, 10))]
        pairs.append(PairExample(tuple(prompt + good + [2]), tuple(prompt + bad + [2])))
    return pairs


def main(loss: str, run_dir: str) -> None:
    cfg = TrainerSections(
        model=ModelSection(
            overrides=dict(
                num_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                num_query_groups=2,
                ffn_hidden_size=128,
                vocab_size=VOCAB,
                max_position_embeddings=SEQ,
                layer_spec="local",
                make_vocab_size_divisible_by=64,
            )
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=5, decay_style="constant"),
        train=TrainConfig(
            train_steps=60, micro_batch_size=8, global_batch_size=16, seq_length=SEQ, log_interval=20
        ),
    )
    cfg.logging.run_dir = run_dir
    init_distributed(cfg.parallel)
    rng = random.Random(0)
    task = make_task(
        "synthetic-rm",
        make_pairs(600, rng),
        make_pairs(200, rng),
        SEQ,
        0,
        RewardConfig(loss=loss, margin=1.0),
    )
    result = run(cfg, task)
    print("RESULT " + json.dumps(result.eval_metrics))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
