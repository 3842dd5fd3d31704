"""Save a random tiny actor (``gpt``) and critic (``value``) as c2f checkpoints, so that runs at different
TP layouts start from identical weights: ``ppo_init.py OUT_DIR MODEL_JSON``."""

import json
import sys
from pathlib import Path

from c2f_megatron.checkpoint.megatron_dir import CheckpointMetadata, save_model_checkpoint
from c2f_megatron.engine import RoleModel
from c2f_megatron.models import ModelConfig
from c2f_megatron.platform import ParallelConfig, destroy_distributed, init_distributed


def main(out: str, model_json: str) -> None:
    init_distributed(ParallelConfig(seed=7))
    cfg = ModelConfig(**json.loads(model_json))
    for kind, name in (("gpt", "actor"), ("value", "critic")):
        role = RoleModel.build(name, kind, cfg)
        save_model_checkpoint(role.chunks, Path(out) / name, CheckpointMetadata(cfg, kind=kind), force=True)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
