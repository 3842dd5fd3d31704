"""Knowledge Residue Merger (the same as ``c2f merge``); see ``c2f_megatron/merge/cli.py`` for the flags.

Megatron checkpoints: ``torchrun --nproc_per_node=N tools/merge_checkpoints.py --a A --b B --gamma 0.7
--out OUT --tp T --pp P``; HF safetensors directories: plain ``python`` (no torch import: a native kernel,
built on first use, does the arithmetic).
"""

import sys

from c2f_megatron.merge.cli import main

if __name__ == "__main__":
    sys.exit(main())
