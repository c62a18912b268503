"""A throwaway two-node Slurm cluster on this machine, for tests.

`SlurmCluster.start(tmp_dir)` runs a private munged (fresh key; socket, pid and seed files
under tmp_dir), slurmctld and two slurmd emulating nodes node1 and node2 (2 CPUs and 2 GB
each as declared, whatever this machine has; both on 127.0.0.1), and returns once both nodes
are idle (about 1.2 s). Ports are picked free and
all state lives under tmp_dir, so a system Slurm or munge is left alone. Accounting is off:
finished jobs are read from `scontrol show job`, which keeps them for MinJobAge (an hour).
Jobs are requeueable (JobRequeue=1); a requeued job starts again about cred_expire + 1
seconds after the requeue (`scontrol update jobid=N StartTime=now` makes that about 1 s).
Needs root; `skip_reason()` says why a cluster cannot be started.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

NODES = ("node1", "node2")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
FINAL_STATES |= {"PREEMPTED", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}  # not REQUEUED, PENDING...
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def skip_reason() -> str | None:
    """Why a test cluster cannot be started here, or None if it can."""
    if os.geteuid() != 0:
        return "Slurm cluster tests need root (they start munged, slurmctld and slurmd)"
    missing = [name for name in DAEMONS + CLIENTS if not shutil.which(name, path=SEARCH_PATH)]
    return f"Slurm/munge programs not found: {', '.join(missing)}" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_job_id() -> int:
    """A job's torchrun port is 20000 + its id (launcher/cluster/topology.py): ids starting
    anywhere in 1..12,000 keep two test clusters running at once (two suites) off each other's
    ports, and below the ports the OS hands out (32,768 and up)."""
    return random.randrange(1, 12_000, 100)


def _slurm_conf(d: Path, cred_expire: int, extra: str) -> str:
    host = socket.gethostname()
    nodes = "".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
        "CPUs=2 RealMemory=2048\n"
        for n in NODES
    )
    return f"""ClusterName=launchertest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdParameters=config_overrides
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.socket,cred_expire={cred_expire}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
FirstJobId={_first_job_id()}
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
{nodes}PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
{extra}
"""


class SlurmCluster:
    """A running test cluster; make one with `SlurmCluster.start(tmp_dir)`, end it with `stop()`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env: dict[str, str] = {"SLURM_CONF": str(directory / "slurm.conf")}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # munged, slurmctld, slurmd-node1...

    @classmethod
    def start(
        cls,
        tmp_dir: str | os.PathLike[str],
        timeout: float = 60.0,
        cred_expire: int = 5,
        extra_conf: str = "",
    ) -> SlurmCluster:
        """Start the daemons and wait until both nodes are idle; on failure raise with log tails.

        cred_expire (seconds; Slurm's minimum is 5, its default 120) is how long a job step
        credential stays valid, and so how long a requeued job waits before it may run again.
        `extra_conf` lines are appended to slurm.conf (a later setting overrides an earlier one).
        """
        d = Path(tmp_dir).resolve()
        for sub in ["state", *(f"spool-{n}" for n in NODES)]:
            (d / sub).mkdir(parents=True, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (d / "slurm.conf").write_text(_slurm_conf(d, cred_expire, extra_conf))
        cluster = cls(d)
        try:  # --force: munged otherwise refuses a socket whose directory is not world-executable
            munged = ["munged", "--foreground", "--force", f"--key-file={key}"]  # logs to stderr
            files = [f"--{f}-file={d}/munged.{f}" for f in ("pid", "seed")]
            cluster._spawn("munged", *munged, *files, f"--socket={d}/munge.socket")
            cluster._wait_for(lambda: (d / "munge.socket").exists(), 10, "munged socket")
            cluster._spawn("slurmctld", "slurmctld", "-D")
            for node in NODES:
                cluster._spawn(f"slurmd-{node}", "slurmd", "-D", "-N", node)
            cluster._wait_for(cluster._nodes_idle, timeout, "two idle nodes")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, name: str, *argv: str) -> None:
        with open(self.dir / f"{name}.stdout", "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=out, cwd=self.dir, env=self._env())
        self._procs[name] = proc

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return base | {"PATH": SEARCH_PATH} | (extra or {}) | self.env

    def _run(
        self,
        *argv: str,
        cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
        out = subprocess.run(
            argv, cwd=cwd, env=self._env(env), capture_output=True, text=True, timeout=30
        )
        if out.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def _nodes_idle(self) -> bool:
        try:
            states = self._run("sinfo", "-h", "-N", "-o", "%N %T").split()
        except RuntimeError:
            return False  # slurmctld not answering yet
        return states == [word for n in NODES for word in (n, "idle")]

    def _wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            exited = [name for name, p in self._procs.items() if p.poll() is not None]
            if exited or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Slurm test cluster: no {what} (exited: {exited})\n" + self.logs()
                )
            time.sleep(0.2)

    def logs(self, lines: int = 20) -> str:
        """The last `lines` lines of each daemon's log and stdout, for error messages."""
        files = sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.stdout"))
        tail = lambda f: "\n".join(f.read_text(errors="replace").splitlines()[-lines:])  # noqa: E731
        return "\n".join(f"--- {f.name}\n{tail(f)}" for f in files)

    def submit(
        self,
        script: str | os.PathLike[str],
        args: list[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> int:
        """`sbatch --parsable SCRIPT ARGS` in `cwd`, exporting `env` on top of ours; the job id."""
        out = self._run("sbatch", "--parsable", str(script), *(args or []), cwd=cwd, env=env)
        return int(out.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """Fields of `scontrol show job -o JOB_ID`: JobState, ExitCode, Restarts, BatchHost..."""
        info: dict[str, str] = {}
        key = ""
        for token in self._run("scontrol", "show", "job", "-o", str(job_id)).split():
            if "=" in token:
                key, value = token.split("=", 1)
                info[key] = value
            elif key:  # a value with spaces, e.g. Command=script arg
                info[key] += " " + token
        return info

    def wait(self, job_id: int, timeout: float = 300.0) -> str:
        """Wait for a final JobState (a requeued job is not final yet) and return it."""
        deadline = time.monotonic() + timeout
        while (state := self.job_info(job_id)["JobState"]) not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout}s\n" + self.logs())
            time.sleep(0.5)  # each look is an scontrol process: jobs take seconds
        return state

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel all jobs, then stop both slurmd, slurmctld and munged and reap them."""
        running = {name for name, proc in self._procs.items() if proc.poll() is None}
        try:
            if {"munged", "slurmctld"} <= running:
                self._run("scancel", "--user=root")
                deadline = time.monotonic() + timeout
                while self._run("squeue", "-h").strip() and time.monotonic() < deadline:
                    time.sleep(0.2)
        except (RuntimeError, subprocess.SubprocessError):
            pass  # stop the daemons regardless
        for proc in reversed(self._procs.values()):
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
