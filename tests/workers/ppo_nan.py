"""``c2f coarse-actor CONFIG`` with the critic's loss turned NaN from iteration ``FROM`` on: every such
iteration skips its update, and the run stops after ``ppo.max_consecutive_nonfinite`` in a row.

Usage: ``ppo_nan.py FROM CONFIG.yaml [key=value ...]`` (one micro-batch per iteration: the loss's call
count is the iteration)."""

import sys

from c2f_megatron.rl import core_algos
from c2f_megatron.rl.cli import main

real_value_loss = core_algos.value_loss
calls = {"n": 0}


def poisoned_value_loss(*args, **kwargs):
    calls["n"] += 1
    loss, stats = real_value_loss(*args, **kwargs)
    return (loss * float("nan"), stats) if calls["n"] >= int(sys.argv[1]) else (loss, stats)


if __name__ == "__main__":  # dist_checkpointing's async save re-imports __main__
    core_algos.value_loss = poisoned_value_loss
    sys.exit(main(sys.argv[2], sys.argv[3:]))
