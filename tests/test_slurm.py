"""The Slurm scripts: lint, the 2-node launch derivation (no Slurm needed), and real single-node Slurm jobs
(a reward-model run on 2 tasks, a preempted run that requeues and resumes with every step once, and the
Coarse Actor script), on a slurmctld + slurmd the fixture starts and stops (``tests/slurm_cluster.py``)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, apt_install

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO_ROOT / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch")) + [SLURM_DIR / "common.sh"]

# sbatch flags that turn the GPU headers into a 2-task CPU job on the test node
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10"]


# -- lint ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck() -> None:
    apt_install(["shellcheck"], ["shellcheck"])
    proc = subprocess.run(
        ["shellcheck", "-x", *(str(p.relative_to(REPO_ROOT)) for p in SCRIPTS)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- launch derivation, simulated --------------------------------------------------------------------
def dry_run(script: str, args: list[str], **slurm_env: str) -> list[str]:
    """Run ``script`` with C2F_DRY_RUN=1 in a clean environment: the launch command it would run."""
    env = {"PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(REPO_ROOT), "C2F_DRY_RUN": "1", **slurm_env}
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / script), *args], env=env, capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


TWO_NODES = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "c2f-rm",
    "SLURM_JOB_NODELIST": "node[01-02]",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_TASKS_PER_NODE": "1(x2)",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_CPUS_ON_NODE": "32",
}


@pytest.mark.parametrize("node_id", ["0", "1"])
def test_two_node_torchrun_arguments(node_id: str) -> None:
    """Both nodes of a 2-node x 8-GPU job derive the same torchrun (node ranks come from the rendezvous)."""
    cmd = dry_run(
        "reward_model.sbatch",
        ["examples/rm_mistral7b.yaml", "train.train_steps=5", "a=b c"],
        SLURM_NODEID=node_id,
        **TWO_NODES,
    )
    assert cmd == [
        "srun",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=32",
        "--kill-on-bad-exit=1",
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node01:24242",
        "--rdzv_id=4242",
        "--max_restarts=0",
        "-m",
        "c2f_megatron.cli",
        "train-rm",
        "examples/rm_mistral7b.yaml",
        "logging.run_dir=runs/c2f-rm-4242",
        "checkpoint.dir=runs/c2f-rm-4242/checkpoints",
        "train.train_steps=5",
        "a=b c",
    ]


def test_launch_variants() -> None:
    """CPU: processes per node = tasks per node; C2F_RUNS/MASTER_PORT honoured; srun mode; tools."""
    env = {
        **TWO_NODES,
        "SLURM_JOB_NODELIST": "gpu[003-004,010],cpu01",
        "SLURM_NNODES": "4",
        "SLURM_NTASKS_PER_NODE": "",
        "SLURM_TASKS_PER_NODE": "2(x4)",
        "C2F_DEVICE": "cpu",
        "C2F_RUNS": "/scratch/r",
        "MASTER_PORT": "29999",
    }
    cmd = dry_run("sft.sbatch", ["c.yaml"], **env)
    assert "--nproc_per_node=2" in cmd and "--nnodes=4" in cmd and "--rdzv_endpoint=gpu003:29999" in cmd
    assert cmd[-3:] == [
        "c.yaml",
        "logging.run_dir=/scratch/r/c2f-rm-4242",
        "checkpoint.dir=/scratch/r/c2f-rm-4242/checkpoints",
    ]
    assert "train-sft" in cmd
    cmd = dry_run("reward_model.sbatch", ["c.yaml"], C2F_LAUNCHER="srun", **TWO_NODES)
    assert cmd[:4] == ["srun", "--kill-on-bad-exit=1", "python3", "-m"]
    merge = dry_run(
        "merge.sbatch",
        ["--a", "A", "--b", "B", "--gamma", "0.7", "--out", "O", "--tp", "2", "--pp=2"],
        **{**TWO_NODES, "SLURM_NNODES": "1"},
    )
    assert "--nproc_per_node=4" in merge and merge[merge.index("tools/merge_checkpoints.py") :] == [
        "tools/merge_checkpoints.py",
        "--a",
        "A",
        "--b",
        "B",
        "--gamma",
        "0.7",
        "--out",
        "O",
        "--tp",
        "2",
        "--pp=2",
    ]
    convert = dry_run(
        "convert.sbatch",
        ["megatron-to-hf", "--megatron-dir", "M", "--out", "H"],
        **{**TWO_NODES, "SLURM_NNODES": "1"},
    )
    assert convert == [
        "srun",
        "--nodes=1",
        "--ntasks=1",
        "--cpus-per-task=32",
        "python3",
        "tools/convert_megatron_to_hf.py",
        "--megatron-dir",
        "M",
        "--out",
        "H",
    ]


def test_hostlist_expansion_matches_python() -> None:
    from c2f_megatron.platform.distributed import first_slurm_host

    hostlist = "gpu[003-005,010],cpu01,a[8-10]"
    proc = subprocess.run(
        ["bash", "-c", f'source slurm/common.sh; c2f_hostnames "{hostlist}"'],
        env={"PATH": "/nonexistent:/bin"},
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    hosts = proc.stdout.split()
    assert hosts == ["gpu003", "gpu004", "gpu005", "gpu010", "cpu01", "a8", "a9", "a10"], proc.stderr
    assert hosts[0] == first_slurm_host(hostlist)


# -- real Slurm ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def job_env(runs: Path) -> dict[str, str]:
    return {
        "C2F_RUNS": str(runs),
        "C2F_DEVICE": "cpu",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }


def rm_overrides(shared_data: Path, steps: int, save_interval: int) -> list[str]:
    return [
        f"data.hh.source={shared_data / 'hh-rlhf/harmless-base/test.jsonl.gz'}",
        f"train.train_steps={steps}",
        f"train.save_interval={save_interval}",
        "train.log_interval=1",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.seq_length=48",
        "train.eval_batches=1",
        "train.keep_last=10",
        "optim.warmup_steps=1",
    ]


def submit(slurm: SlurmCluster, tmp: Path, script: str, args: list[str], name: str) -> tuple[int, Path]:
    job = slurm.sbatch(
        SLURM_DIR / script,
        args,
        env=job_env(tmp / "runs"),
        cwd=REPO_ROOT,
        options=[*CPU_JOB, f"--job-name={name}", f"--output={tmp}/%x-%j.out"],
    )
    return job, tmp / "runs" / f"{name}-{job}"


def job_failure(slurm: SlurmCluster, job: int, tmp: Path, record: dict[str, str]) -> str:
    outs = "\n".join(p.read_text(errors="replace")[-6000:] for p in tmp.glob(f"*-{job}.out"))
    return f"job {job}: {record}\n--- job output ---\n{outs}\n{slurm.logs(1500)}"


def train_steps_logged(run_dir: Path) -> list[int]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if "train/loss" in r]


@pytest.fixture(scope="module")
def rm_job(slurm: SlurmCluster, shared_data: Path, tmp_path_factory) -> tuple[dict[str, str], Path, Path]:
    """A 3-step reward-model job on 2 tasks (its checkpoint is also the Coarse Actor test's reward model)."""
    tmp = tmp_path_factory.mktemp("rm_job")
    args = ["examples/rm_cpu.yaml", *rm_overrides(shared_data, steps=3, save_interval=0)]
    job, run_dir = submit(slurm, tmp, "reward_model.sbatch", args, "rm")
    record = slurm.wait(job, timeout=240)
    assert record["JobState"] == "COMPLETED", job_failure(slurm, job, tmp, record)
    return record, run_dir, tmp


def test_reward_model_job_completes(rm_job: tuple[dict[str, str], Path, Path]) -> None:
    _, run_dir, _ = rm_job
    assert (run_dir / "checkpoints" / "step_0000003" / "trainer_state.json").is_file()
    assert train_steps_logged(run_dir) == [1, 2, 3]
    log = (run_dir / "job.log").read_text()
    assert "2 process(es) per node" in log and "DP 2" in log


def test_preempted_job_requeues_and_resumes(slurm: SlurmCluster, shared_data: Path, tmp_path: Path) -> None:
    steps = 16
    job, run_dir = submit(
        slurm,
        tmp_path,
        "reward_model.sbatch",
        ["examples/rm_cpu.yaml", *rm_overrides(shared_data, steps=steps, save_interval=4)],
        "pre",
    )
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + 180
    while not (ckpts / "step_0000004" / "trainer_state.json").is_file():
        state = slurm.state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), job_failure(
            slurm, job, tmp_path, slurm.job(job)
        )
        assert time.monotonic() < deadline, job_failure(slurm, job, tmp_path, slurm.job(job))
        time.sleep(0.2)
    slurm.signal(job, "USR1")  # what --signal=B:USR1@N does before the time limit
    # the job requeues itself (Restarts=1) and runs to the end
    record = slurm.wait(job, timeout=300)
    assert record["JobState"] == "COMPLETED", job_failure(slurm, job, tmp_path, record)
    assert record.get("Restarts") == "1", job_failure(slurm, job, tmp_path, record)
    log = (run_dir / "job.log").read_text()
    assert "requeueing job" in log, log[-4000:]
    stopped = [line for line in log.splitlines() if "checkpointed and stopping at step" in line]
    assert len(stopped) == 1, log[-4000:]
    stop_step = int(stopped[0].rsplit(" ", 1)[1])
    assert 4 <= stop_step < steps
    assert f"resumed from {ckpts / f'step_{stop_step:07d}'} at step {stop_step}" in log, log[-4000:]
    # every step exactly once across the two runs: none lost, none repeated
    assert train_steps_logged(run_dir) == list(range(1, steps + 1))
    assert (ckpts / f"step_{steps:07d}").is_dir()
    assert not (run_dir / "preempted.json").exists()  # cleared by the requeued run, which finished


def test_coarse_actor_job_completes(
    slurm: SlurmCluster, rm_job: tuple[dict[str, str], Path, Path], shared_data: Path, tmp_path: Path
) -> None:
    config = REPO_ROOT / "examples" / "coarse_actor_cpu.yaml"
    if not config.is_file():
        pytest.skip("examples/coarse_actor_cpu.yaml does not exist yet (the PPO trainer's CPU example)")
    _, rm_run, _ = rm_job
    args = [
        "examples/coarse_actor_cpu.yaml",
        f"data.hh.source={shared_data / 'hh-rlhf/harmless-base/test.jsonl.gz'}",
        f"reward.path={rm_run / 'checkpoints'}",
        "ppo.iterations=2",
        "ppo.micro_batch_size=2",  # the example is sized for one process: 4 per mini-batch / DP 2
        "checkpoint.save_interval=1",
    ]
    job, run_dir = submit(slurm, tmp_path, "coarse_actor.sbatch", args, "ca")
    record = slurm.wait(job, timeout=300)
    assert record["JobState"] == "COMPLETED", job_failure(slurm, job, tmp_path, record)
    assert (run_dir / "checkpoints" / "step_0000002").is_dir()
