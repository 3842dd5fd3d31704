"""Real-model checks of the converted SmolLM2-135M-Instruct Megatron checkpoint (run by test_smollm2.py).

``layouts CKPT REF LAYOUT...`` (under torchrun): for each layout (``tp3``, ``pp2``, ``tp1``, ...) in turn,
build the model there (sdpa spec, fp32), load the checkpoint (resharded by dist_checkpointing) and print
the max |logit difference| against the reference HF logits in ``REF`` (a .pt file of tokens, lengths and
logits) over every real position.

``generate CKPT TOKENIZER PROMPTS REQUESTS OUT`` (one process): greedy KV-cached rollouts with EOS
suppressed (coarse mode) for the prompt ids in ``PROMPTS``, and ``MegatronLM.loglikelihood`` of the
(context, continuation) pairs in ``REQUESTS``; both written as JSON to ``OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def layouts(ckpt: Path, ref_path: Path, names: list[str]) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from c2f_megatron.checkpoint.verify import megatron_logits
    from c2f_megatron.engine import RoleModel
    from c2f_megatron.platform.distributed import ParallelConfig, init_distributed

    ref = torch.load(ref_path, weights_only=True)
    for name in names:
        kind, size = name[:2], int(name[2:])
        tp, pp = (size, 1) if kind == "tp" else (1, size)
        init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        role = RoleModel.from_checkpoint("model", "gpt", ckpt, runtime={"layer_spec": "sdpa"})
        ours = megatron_logits(role.module, ref["tokens"], role.model_cfg.vocab_size)
        diff = torch.zeros(1, dtype=torch.float64)
        if ours is not None:
            for i, n in enumerate(ref["lengths"].tolist()):
                d = (ours[i, :n].double() - ref["logits"][i, :n].double()).abs().max()
                diff[0] = max(diff[0], d)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            print(
                f"LAYOUT {name} TP{ps.get_tensor_model_parallel_world_size()} "
                f"PP{ps.get_pipeline_model_parallel_world_size()} max_abs_diff {diff.item():.3e}",
                flush=True,
            )
        del role


def generate(ckpt: Path, tokenizer: str, prompts_path: Path, requests_path: Path, out: Path) -> None:
    from c2f_megatron.data import load_tokenizer
    from c2f_megatron.eval.megatron_model import MegatronLM
    from c2f_megatron.generation.rollout import GenerationConfig
    from c2f_megatron.generation.rollout import generate as rollout
    from c2f_megatron.platform.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    tok = load_tokenizer(tokenizer)
    lm = MegatronLM.from_checkpoint(ckpt, tok, batch_size=8)
    prompts = json.loads(prompts_path.read_text())
    gen = GenerationConfig(64, greedy=True, suppress_ids=[tok.eos_id], pad_id=tok.pad_id)
    responses = rollout(lm.chunk, lm.role.layout, prompts, gen, tok.vocab_size).response_ids()
    requests = [tuple(r) for r in json.loads(requests_path.read_text())]
    out.write_text(json.dumps({"responses": responses, "loglikelihood": lm.loglikelihood(requests)}))


if __name__ == "__main__":
    if sys.argv[1] == "layouts":
        layouts(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    else:
        ckpt, tokenizer, prompts, requests, out = sys.argv[2:7]
        generate(Path(ckpt), tokenizer, Path(prompts), Path(requests), Path(out))
