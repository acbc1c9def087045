"""One owner per run folder, and no process that outlives its launcher.

    lock = RunLock(run_dir)          # main process, before anything is written; raises RunFolderBusy
    segment = lock.record_start({...})   # appends to run_dir/starts.jsonl: this start is segment N
    die_with_parent()                # trainer processes under a launcher, and every data worker

The lock is a POSIX record lock (fcntl.lockf) on run_dir/.lock, held by the main process for as long
as it lives: the kernel releases it when that process exits or is killed, whatever the signal, so
there is nothing stale to clean up. POSIX locks work on NFS and Lustre (mounted with flock/localflock
or NFSv4), where a lock held on one node is seen on the others. The file's content names the holder
(pid, host, Slurm job, start time); it only matters while the lock is held.

torch's elastic agent (what `accelerate launch --multi_gpu` and torchrun run) starts each worker in a
new session, so `kill -9 -- -<pgid>` of the launcher, or a node agent killing the launcher alone,
leaves the workers training on unsupervised, writing checkpoints and metrics beside the restarted
run. Linux's PR_SET_PDEATHSIG makes the kernel SIGKILL a process when its parent dies.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from pipeline import durable
from pipeline.errors import UserError

LOCK_FILE = ".lock"
STARTS_FILE = "starts.jsonl"
_PR_SET_PDEATHSIG = 1


class RunFolderBusy(UserError):
    """Another live process holds the run folder. The message names it."""


def launched_by_torchrun() -> bool:
    """True in a worker started by torch's elastic agent (accelerate launch --multi_gpu, torchrun)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent process dies (Linux; a no-op elsewhere).

    If the parent is already gone when this runs (the process was re-parented), the signal is sent
    now: nothing of a dead launch may go on."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent == 1 or os.getppid() != parent:  # the launcher died before the prctl took effect
        os.kill(os.getpid(), sig)


def holder_info() -> dict:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if os.environ.get("SLURM_JOB_ID"):
        info["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return info


def _describe(info: dict) -> str:
    if not info:
        return "another process"
    where = f"pid {info.get('pid')} on {info.get('host')}"
    if info.get("slurm_job_id"):
        where += f" (Slurm job {info['slurm_job_id']})"
    return f"{where}, started {info.get('started')}"


class RunLock:
    """Exclusive ownership of a run folder by this process, until it exits (or release())."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (ValueError, UnicodeDecodeError):
                holder = {}
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RunFolderBusy(
                f"run folder {self.run_dir} is in use by {_describe(holder)}; wait for that run to finish or "
                f"stop it (kill {holder.get('pid', '<pid>')}), or train in another folder with run.name=...") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        self.fd: int | None = fd

    def record_start(self, details: dict) -> int:
        """Append this start to run_dir/starts.jsonl and return its segment number (1 for the first
        start of the folder, 2 after one restart, ...). Only the lock holder writes the file."""
        path = self.run_dir / STARTS_FILE
        text = path.read_text() if path.exists() else ""
        segment = 1 + sum(1 for line in text.split("\n")[:-1] if line.strip())
        torn = bool(text) and not text.endswith("\n")  # a start killed while writing its line
        durable.append_line(path, ("\n" if torn else "") + json.dumps({"segment": segment, **holder_info(), **details}))
        return segment

    def record_exit(self, segment: int, exit_code: int, step: int) -> None:
        """run_dir/exit.json: how the latest start ended ({"segment", "exit_code", "step"}); 75 means it
        saved a checkpoint on a stop signal and is to be continued (pipeline.sweep reads it: launchers
        turn a worker's 75 into their own exit code 1). A killed start writes nothing."""
        path = self.run_dir / "exit.json"
        durable.write_json(path, {"segment": segment, "exit_code": exit_code, "step": step})

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the POSIX lock
            self.fd = None


def own_run_folder(run_dir: Path, accelerator, busy: Callable[[RunFolderBusy], Exception] | None = None
                   ) -> RunLock | None:
    """The main process takes the run folder's lock; every rank learns whether it got it, so all stop
    together (with the main process's one sentence) when another live run holds the folder. `busy` turns
    the RunFolderBusy into the caller's own error (pipeline.encode words it for an output folder)."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(run_dir)
        except RunFolderBusy as e:
            error = busy(e) if busy is not None else e
    got = torch.tensor([0 if error else 1], device=accelerator.device)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        got = broadcast(got, from_process=0)
    if error is not None:
        raise error
    if not got.item():
        raise SystemExit(2)  # the main process says why
    return lock
