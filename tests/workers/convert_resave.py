"""Load a streamed c2f checkpoint at the launched TP/PP through megatron's own loader and save it again with
megatron's own writer (``save_model_checkpoint``), for the streaming-converter tests."""

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()

    from c2f_megatron.checkpoint.megatron_dir import (
        load_model_checkpoint,
        read_metadata,
        save_model_checkpoint,
    )
    from c2f_megatron.models.gpt import build_gpt_model
    from c2f_megatron.platform.distributed import ParallelConfig, init_distributed

    meta = read_metadata(args.src)
    init_distributed(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp))
    model = build_gpt_model(meta.model, perform_initialization=False)
    load_model_checkpoint([model], args.src)
    save_model_checkpoint([model], args.out, meta)


if __name__ == "__main__":
    main()
