"""Where the code runs: device and backend choice, distributed init, and megatron-core's CPU redirections."""

from c2f_megatron.platform.distributed import (
    LaunchEnv,
    ParallelConfig,
    destroy_distributed,
    device,
    init_distributed,
    is_rank_zero,
    read_launch_env,
    seed_everything,
    use_cuda,
)

__all__ = [
    "LaunchEnv",
    "ParallelConfig",
    "destroy_distributed",
    "device",
    "init_distributed",
    "is_rank_zero",
    "read_launch_env",
    "seed_everything",
    "use_cuda",
]
