"""Run ``c2f coarse-actor CONFIG.yaml [key=value ...]`` in-process (one rank of a torchrun job, or alone)."""

import sys

from c2f_megatron.rl.cli import main

if __name__ == "__main__":  # dist_checkpointing's async save re-imports __main__
    sys.exit(main(sys.argv[1], sys.argv[2:]))
