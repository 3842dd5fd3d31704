"""A real single-node Slurm (Debian's slurmctld + slurmd 22.05) for the tests, started and stopped here.

``SlurmCluster.start(workdir)`` installs the Debian packages when ``slurmctld`` is missing (root + apt;
otherwise it fails with what to do), writes a slurm.conf for ``localhost`` (2 CPUs, no cgroups,
``auth/none`` + ``cred/none`` so no munge, no accounting, fast scheduling and requeue), starts both
daemons in the foreground as children (no systemd), and waits for the node to be idle. ``stop()``
cancels every job, waits for them to end, and stops the daemons; the state lives under ``workdir``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


class SlurmError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apt_install(packages: Iterable[str], binaries: Iterable[str]) -> None:
    """``apt-get install`` the packages unless every binary is on PATH; clear failure without root/apt."""
    if all(shutil.which(b) for b in binaries):
        return
    packages = list(packages)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmError(
            f"{', '.join(binaries)} not found and cannot install {' '.join(packages)} (needs root and "
            f"apt-get); install them: apt-get install {' '.join(packages)}"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SlurmError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )


SLURM_CONF = """\
ClusterName=c2ftest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobContainerType=job_container/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=1,sched_interval=1,bf_interval=1,sched_min_interval=100000
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=300
MessageTimeout=20
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._daemons: list[subprocess.Popen] = []

    # -- life cycle ---------------------------------------------------------------------------------
    @classmethod
    def start(cls, root: Path, cpus: int = 2, timeout: float = 60) -> SlurmCluster:
        apt_install(PACKAGES, ["slurmctld", "slurmd", "sbatch"])
        cluster = cls(root, cpus)
        try:
            cluster._start(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self, timeout: float) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            SLURM_CONF.format(
                root=self.root, cpus=self.cpus, ctld_port=_free_port(), slurmd_port=_free_port()
            )
        )
        self._spawn(["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._wait_for(
            lambda: self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"]),
            timeout,
            "slurmctld did not answer scontrol ping",
        )
        self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", "localhost"], "slurmd.out")
        self._wait_for(self._node_idle, timeout, "node localhost did not become idle")

    def _spawn(self, cmd: list[str], log: str) -> None:
        with open(self.root / log, "ab") as out:
            self._daemons.append(
                subprocess.Popen(
                    cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def _node_idle(self) -> bool:
        state = self._out(["sinfo", "-h", "-N", "-o", "%T"]).strip().lower()
        return state.startswith("idle")

    def stop(self) -> None:
        """Cancel every job, wait for them to end (slurmstepd and the job processes), stop the daemons."""
        if self._daemons and self._ok(["scontrol", "ping"]):
            self._run(["scancel", "--full", "--user=root"])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self._out(["squeue", "-h", "-o", "%i"]).strip():
                time.sleep(0.5)
        for proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._daemons.clear()
        shutil.rmtree(self.root / "state", ignore_errors=True)
        shutil.rmtree(self.root / "spool", ignore_errors=True)

    # -- jobs ---------------------------------------------------------------------------------------
    def sbatch(
        self,
        script: str | Path,
        args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        options: Iterable[str] = (),
        cwd: str | Path | None = None,
    ) -> int:
        """Submit ``script args`` (``options`` are extra sbatch flags; ``env`` is exported on top of ALL)."""
        export = ",".join(["ALL", *(f"{k}={v}" for k, v in (env or {}).items())])
        cmd = ["sbatch", "--parsable", f"--export={export}", *options, str(script), *args]
        proc = self._run(cmd, cwd=cwd)
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, StdOut...)."""
        out = self._out(["scontrol", "show", "job", "-o", str(job_id)])
        fields: dict[str, str] = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(
        self, job_id: int, states: Iterable[str] = FINISHED, timeout: float = 120, poll: float = 0.5
    ) -> dict[str, str]:
        """Poll until the job's state is one of ``states``; raise with the job record and logs on timeout."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("JobState") in wanted:
                return job
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"job {job_id} not in {sorted(wanted)} after {timeout:.0f} s: {job}\n{self.logs()}"
                )
            time.sleep(poll)

    def requeue(self, job_id: int) -> None:
        self._check(["scontrol", "requeue", str(job_id)])

    def signal(self, job_id: int, sig: str = "USR1", batch: bool = True) -> None:
        """Send ``sig`` to the batch shell (as ``--signal=B:...`` does) or to every step."""
        self._check(["scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id)])

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- helpers ------------------------------------------------------------------------------------
    def _run(self, cmd: list[str], cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, cwd=cwd)

    def _ok(self, cmd: list[str]) -> bool:
        try:
            return self._run(cmd).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _out(self, cmd: list[str]) -> str:
        try:
            return self._run(cmd).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    def _check(self, cmd: list[str]) -> None:
        proc = self._run(cmd)
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")

    def _wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            for proc in self._daemons:
                if proc.poll() is not None:
                    raise SlurmError(f"{proc.args[0]} exited with {proc.returncode}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise SlurmError(f"{what} within {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.3)
