"""HF Mistral/Llama -> c2f megatron checkpoint; same as ``c2f convert hf-to-megatron``.

python tools/convert_hf_to_megatron.py --hf-dir DIR --out DIR [--dtype fp32|bf16] [--verify] [--force]
torchrun --nproc_per_node=4 tools/convert_hf_to_megatron.py --hf-dir DIR --out DIR --tp 2 --pp 2
"""

import argparse
import sys

from c2f_megatron.checkpoint.convert_cli import add_hf_to_megatron_args, run_hf_to_megatron

if __name__ == "__main__":  # megatron's checkpoint save re-imports __main__ in a spawned process
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_hf_to_megatron_args(parser)
    sys.exit(run_hf_to_megatron(parser.parse_args()))
