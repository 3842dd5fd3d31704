"""Run one training command in-process: ``train_cli.py train-rm CONFIG.yaml [key=value ...]``."""

import sys

from c2f_megatron.training.cli import main

if __name__ == "__main__":  # dist_checkpointing's async save re-imports __main__
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
