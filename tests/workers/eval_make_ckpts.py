"""Write tiny random c2f checkpoints for the eval tests: ``OUT/lm`` (gpt), ``OUT/lm2`` (gpt, other seed) and
``OUT/rm`` (value), all with the Mistral v0.1 tokenizer recorded. Single process."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from c2f_megatron.checkpoint.megatron_dir import CheckpointMetadata, save_model_checkpoint
from c2f_megatron.data import load_tokenizer
from c2f_megatron.models.config import ModelConfig
from c2f_megatron.models.gpt import build_gpt_model
from c2f_megatron.models.value_head import build_value_model
from c2f_megatron.platform.distributed import ParallelConfig, init_distributed

TINY = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=32000,
    max_position_embeddings=256,
    layer_spec="sdpa",
    init_method_std=0.2,  # peaked distributions: greedy decoding is not all ties
)


def main(out: Path) -> None:
    init_distributed(ParallelConfig())
    info = load_tokenizer().info().to_dict()
    for name, seed, kind in (("lm", 1, "gpt"), ("lm2", 2, "gpt"), ("rm", 3, "value")):
        torch.manual_seed(seed)
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        model = build_gpt_model(TINY) if kind == "gpt" else build_value_model(TINY, head_seed=seed)
        save_model_checkpoint([model], out / name, CheckpointMetadata(TINY, info, kind, "fp32"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
