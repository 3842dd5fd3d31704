"""Launcher environments (torchrun, Slurm srun, plain python) map to rank/world/master correctly."""

from __future__ import annotations

import pytest

from c2f_megatron.platform.distributed import first_slurm_host, read_launch_env


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "2222"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 8, 1)
    assert (launch.master_addr, launch.master_port, launch.launcher) == ("node7", 2222, "torchrun")


def test_torchrun_wins_inside_slurm():
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "16"}
    assert read_launch_env(env).launcher == "torchrun"


def test_srun_env_derives_master_from_nodelist():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[003-004]",
        "SLURM_JOB_ID": "4242",
    }
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (9, 16, 1)
    assert launch.master_addr == "gpu003"
    assert launch.master_port == 10000 + 4242 % 20000
    assert launch.launcher == "slurm"


@pytest.mark.parametrize(
    "nodelist,first",
    [("node1", "node1"), ("gpu[003-005,010]", "gpu003"), ("a[7,9],b2", "a7"), ("n[01-02],m[3-4]", "n01")],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_single_process_env():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")
    assert launch.master_port > 0
