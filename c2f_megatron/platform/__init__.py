"""Where the code runs: device and backend choice, distributed init (which applies both patch sets to
megatron-core: ``megatron_cpu``'s CUDA redirections and ``adam_fallback``'s optimizer fixes, sharing
``patching``), and a role's own process groups (``role_layout``)."""

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
