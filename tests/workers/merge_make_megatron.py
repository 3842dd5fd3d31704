"""Write random tiny bf16 c2f megatron checkpoints ``a``, ``b``, ``base`` at the launched TP (merge tests)."""

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()

    import torch.distributed as dist

    from c2f_megatron.checkpoint.megatron_dir import CheckpointMetadata, save_model_checkpoint
    from c2f_megatron.models.config import get_preset
    from c2f_megatron.models.gpt import build_gpt_model
    from c2f_megatron.platform.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=args.tp))
    cfg = get_preset("mistral-nano", vocab_size=1000, params_dtype="bf16", layer_spec="local")
    model = build_gpt_model(cfg, perform_initialization=False)
    for i, name in enumerate(("a", "b", "base")):
        torch.manual_seed(1000 * i + dist.get_rank())
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.5)  # norms too: every tensor must differ between the checkpoints
        meta = CheckpointMetadata(model=cfg, tokenizer={"kind": "test", "vocab_size": 1000}, dtype="bf16")
        save_model_checkpoint([model], args.out_dir / name, meta)


if __name__ == "__main__":
    main()
