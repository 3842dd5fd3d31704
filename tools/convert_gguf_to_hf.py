"""llama.cpp GGUF (Llama architecture) -> HF Llama directory; same as ``c2f convert gguf-to-hf``.

python tools/convert_gguf_to_hf.py --gguf FILE.gguf --out DIR [--dtype fp32|bf16|fp16] [--force]
"""

import argparse
import sys

from c2f_megatron.checkpoint.convert_cli import add_gguf_to_hf_args, run_gguf_to_hf

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_gguf_to_hf_args(parser)
    sys.exit(run_gguf_to_hf(parser.parse_args()))
