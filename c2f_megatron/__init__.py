"""c2f-megatron: the Mistral-C2F recipe (reward model, Coarse Actor PPO with Continuous Maximization,
Knowledge Residue Merger) on Megatron-Core with tensor and pipeline parallelism."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core warns at import, once per module (14 lines a job), that Transformer Engine and apex are
# missing; every job prints one line naming the layer spec it runs instead (models/specs.py).
_warnings.filterwarnings(
    "ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed", category=UserWarning
)
# Deprecations inside megatron-core 0.16.1 and the torch.distributed.checkpoint calls it makes, which no
# setting of ours can avoid; they would otherwise open every job's log.
for _message, _category in (
    (r"full scope is deprecated", UserWarning),
    (r"`load_state_dict` is deprecated", FutureWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
):
    _warnings.filterwarnings("ignore", message=_message, category=_category)
