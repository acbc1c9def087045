"""A real two-node Slurm cluster on this machine, for the tests of slurm/*.sbatch.

    with SlurmCluster(tmp_dir) as cluster:       # installs Slurm with apt-get when it is missing
        job = cluster.sbatch(["slurm/multinode.sbatch", "recipes/x.yaml"], cwd=repo)
        cluster.wait_done(job, timeout_s=120)

One slurmctld and two slurmd (`slurmd -N <name>`) run from a slurm.conf in a temporary folder,
with no systemd, cgroups or munge: proctrack/linuxproc, task/none, auth/none + cred/none. The two
nodes are this host twice: NodeAddr=127.0.0.1 with distinct ports, named after the hostname and
`localhost` (both resolve; the other order fails with "Duplicated NodeHostName"), each with two fake
GPUs (gres.conf). State, spool, pid and log files all live under the folder; `SLURM_CONF` in
`cluster.env` points every client (and, through the job's exported environment, every srun inside a
job) at it. `stop()` cancels the jobs,
stops the daemons by their pid files and finally ends any process still carrying this cluster's
SLURM_CONF in its environment (job steps outlive slurmd), so nothing outlives the tests.

Run it by hand to poke at it: `python tests/slurm_cluster.py /tmp/cluster` starts it, prints the
`export SLURM_CONF=...` line and runs until Ctrl-C or `kill <pid>`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "shellcheck"]  # (shellcheck: test_slurm lints slurm/)
DAEMON_BINARIES = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd"]
GPUS_PER_NODE = 2  # fake GPUs on each node (see write_config)


def unavailable_reason() -> str | None:
    """Install Slurm if it is missing. Returns why it cannot be (not root, no apt-get: a reason to
    skip), or None when it is ready; a failing apt-get raises, it is not a reason to skip."""
    if all(Path(b).exists() for b in DAEMON_BINARIES) and shutil.which("sbatch") and shutil.which("shellcheck"):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root (apt-get install slurmctld slurmd slurm-client)"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and this machine has no apt-get to install it with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
    return None


class SlurmCluster:
    """slurmctld + two slurmd on localhost, configured and kept under `root`."""

    def __init__(self, root: Path, cpus_per_node: int | None = None):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # Each node offers this host's usable cores (no more, or slurmd would drain it as "Low CPUs").
        self.cpus_per_node = cpus_per_node or len(os.sched_getaffinity(0))
        # Node names must resolve; hostname first, then localhost (see the module docstring).
        self.nodes = [socket.gethostname(), "localhost"]
        if self.nodes[0] == "localhost":
            raise RuntimeError("this machine's hostname is 'localhost'; the two-node cluster needs another one")

    def write_config(self) -> None:
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=pipeline-test",
            f"SlurmctldHost={self.nodes[0]}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            # No munge: requests are trusted as they are (a throwaway cluster on one host).
            "AuthType=auth/none",
            "CredType=cred/none",
            # A requeued job may start again after cred_expire + 1 s (121 s by default); 5 is the least
            # Slurm accepts, and every requeue test waits it out.
            "AuthInfo=cred_expire=5",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            # Look at pending jobs every second, not every 60 s: a requeued job starts as soon as
            # its BeginTime (requeue + cred_expire + 1 s) has passed.
            "SchedulerParameters=sched_interval=1",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "GresTypes=gpu",
        ]
        for name in self.nodes:
            lines.append(f"NodeName={name} NodeAddr=127.0.0.1 Port={free_port()} "
                         f"CPUs={self.cpus_per_node} Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        # Fake GPUs: empty files stand in for /dev/nvidia<i> (slurmd logs that they are not devices, and
        # carries on). Slurm allocates and reports them (SLURM_GPUS_ON_NODE, `scontrol show job -d`) as on
        # a GPU cluster, and nothing can use them: jobs that train ask for --gpus-per-node=0.
        (self.root / "dev").mkdir(exist_ok=True)
        for i in range(GPUS_PER_NODE):
            (self.root / "dev" / f"gpu{i}").touch()
        (self.root / "gres.conf").write_text("".join(
            f"NodeName={name} Name=gpu File={r}/dev/gpu[0-{GPUS_PER_NODE - 1}]\n" for name in self.nodes))

    # ---------------------------------------------------------------- daemons

    def _pid_files(self) -> list[Path]:
        return [self.root / "run" / f"slurmd-{n}.pid" for n in self.nodes] + [self.root / "run" / "slurmctld.pid"]

    def start(self, timeout_s: float = 60) -> None:
        self.write_config()
        # -i: ignore a stale state folder; daemons fork into the background and write pid files.
        self._run(["/usr/sbin/slurmctld", "-i"])
        for name in self.nodes:
            self._run(["/usr/sbin/slurmd", "-N", name])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes did not become idle in {timeout_s:.0f} s: {states}\n{self.logs()}")

    def _run(self, cmd: list[str]) -> None:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}\n{self.logs()}")

    def stop(self) -> None:
        if not self.conf.exists():
            return
        subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.squeue():
            time.sleep(0.5)
        _end([int(f.read_text().split()[0]) for f in self._pid_files() if f.exists()])
        # Job steps (slurmstepd and what it runs) outlive slurmd; they all carry our SLURM_CONF.
        _end(self._processes_with_our_conf(), grace_s=2)

    def _processes_with_our_conf(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode() + b"\0"
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if marker in (proc / "environ").read_bytes() + b"\0":
                        pids.append(int(proc.name))
                except OSError:
                    pass
        return pids

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- jobs

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> str:
        r = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def squeue(self, job_id: str | None = None) -> str:
        """`%T` state of the job (or all jobs), empty once it has left the queue."""
        cmd = ["squeue", "-h", "-o", "%T"] + (["-j", job_id] if job_id else [])
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else ""

    def wait_done(self, job_id: str, timeout_s: float, poll_s: float = 0.5) -> None:
        """Poll squeue until the job has left the queue (faster than `sbatch --wait`'s ~10 s polls)."""
        deadline = time.monotonic() + timeout_s
        while self.squeue(job_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {self.squeue(job_id)} after {timeout_s:.0f} s\n{self.logs()}")
            time.sleep(poll_s)

    def scancel(self, *args: str) -> None:
        subprocess.run(["scancel", *args], env=self.env, check=True, capture_output=True, timeout=30)

    def scontrol(self, *args: str) -> str:
        r = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout

    def logs(self, tail_lines: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-tail_lines:]))
        return "\n".join(out)


def _end(pids: list[int], grace_s: float = 10) -> None:
    """SIGTERM to each pid, then SIGKILL to those still alive after grace_s; gone pids are fine."""
    alive = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _exists(pid)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    import sys

    reason = unavailable_reason()
    if reason:
        sys.exit(reason)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill <pid>` stops the cluster too
    with SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm-cluster")) as c:
        print(f"export SLURM_CONF={c.conf}   # cluster up; Ctrl-C (or kill) stops it", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
