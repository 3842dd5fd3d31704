"""c2f megatron checkpoint -> HF Mistral/Llama (safetensors shards + index + config.json); same as
``c2f convert megatron-to-hf``.

    python tools/convert_megatron_to_hf.py --megatron-dir DIR --out DIR [--dtype fp32|bf16] [--force]
    torchrun --nproc_per_node=2 tools/convert_megatron_to_hf.py --megatron-dir DIR --out DIR --pp 2
"""

import argparse
import sys

from c2f_megatron.checkpoint.convert_cli import add_megatron_to_hf_args, run_megatron_to_hf

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_megatron_to_hf_args(parser)
    sys.exit(run_megatron_to_hf(parser.parse_args()))
