"""A launched command and every process it starts, for tests that kill runs.

    launch = Launch(cmd, env=TEST_ENV, cwd=ROOT)   # in its own session, like a job step
    launch.wait_until(lambda: ..., timeout_s=120)  # polls; records the process tree as it grows
    launch.wait(timeout_s=300)                     # until the launcher exits (recording meanwhile)
    launch.kill_group()                            # kill -9 -- -<pgid>: what a user or a scheduler does
    launch.kill_all()                              # SIGKILL every process ever seen, by pid
    assert launch.survivors() == []                # none of them is still alive

torch's elastic agent (under `accelerate launch`) starts its workers with start_new_session=True,
so they are not in the launcher's process group: killing the group alone leaves them running
unless the trainer dies with its parent. The tree is therefore recorded by walking children
(psutil, which accelerate already depends on) every time the test polls, so a worker is known by
pid even after its parent is gone. A pid is identified together with its start time, so a pid
reused by an unrelated process is never mistaken for a survivor or killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from typing import Callable

import psutil


class Launch:
    def __init__(self, cmd: list[str], env: dict, cwd) -> None:
        self.cmd = cmd
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty run never blocks on it
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.seen: dict[int, float] = {}  # pid -> create_time
        self.record()

    def record(self) -> None:
        """Add the launcher and all of its current descendants to the processes seen."""
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self.seen.setdefault(p.pid, p.create_time())
        except psutil.NoSuchProcess:
            pass
        # Orphans already re-parented away from the launcher are found through the ones known.
        for pid in list(self.seen):
            try:
                for child in psutil.Process(pid).children(recursive=True):
                    self.seen.setdefault(child.pid, child.create_time())
            except psutil.NoSuchProcess:
                continue

    def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str = "the condition") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.record()
            if condition():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{what}: the command exited with {self.proc.returncode} first:\n"
                                     f"{self.output()[-4000:]}")
            time.sleep(0.02)
        raise AssertionError(f"{what}: not reached in {timeout_s} s")

    def wait(self, timeout_s: float) -> int:
        """Wait for the launcher to exit, recording its process tree meanwhile; returns its exit code."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{' '.join(self.cmd[:4])} ... still running after {timeout_s} s")
            self.record()
            time.sleep(0.05)
        return self.proc.returncode

    def alive(self) -> list[psutil.Process]:
        out = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                continue
        return out

    def kill_group(self) -> None:
        """SIGKILL the launcher's process group (the launcher and what stayed in its session)."""
        self.record()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def kill_all(self) -> None:
        """SIGKILL every process of this launch, by pid, wherever it went."""
        self.record()
        for p in self.alive():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        psutil.wait_procs(self.alive(), timeout=10)

    def survivors(self, grace_s: float = 2.0) -> list[str]:
        """The processes of this launch still alive after `grace_s` seconds (as 'pid cmdline')."""
        self.proc.poll()
        deadline = time.monotonic() + grace_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = []
        for p in self.alive():
            try:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
            except psutil.NoSuchProcess:
                continue
        return out

    def output(self) -> str:
        """Everything the launch printed so far (stdout and stderr)."""
        self.log.seek(0)
        return self.log.read()
