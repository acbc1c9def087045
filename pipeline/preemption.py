"""Stop cleanly on SIGUSR1 / SIGTERM (SLURM preemption, `scancel`, torchrun shutting down).

The signal only sets a flag. Ranks receive it at different moments, so they must agree on the step
at which to stop, or one rank would wait forever in a collective the others never join. Agreement
costs no GPU sync: each step starts an asynchronous all-reduce (MAX) of the local flag on a small
gloo group over the CPU, and reads the result one step later. Every rank therefore sees the same
answer after the same step, then all save one checkpoint together and exit with EXIT_PREEMPTED.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75
"""Exit code after a signal-triggered checkpoint (EX_TEMPFAIL: run the same command again to resume)."""

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
MARGIN_ENV = "VAE_SIGNAL_MARGIN_SECONDS"
"""Seconds between the scheduler's warning signal and the hard kill (slurm/*.sbatch set it from their
`#SBATCH --signal=B:USR1@<seconds>` line; Slurm does not tell a job its own --signal)."""


GROUP_TIMEOUT = timedelta(minutes=5)
"""How long the stop flag's gloo group waits for a rank (to connect, or to join an all-reduce) before
it fails: gloo's default is 30 minutes of a silent hang when a node is unreachable or gone."""


def start_compile_workers() -> None:
    """Start torch.compile's compile worker processes now, with USR1 and TERM ignored, so that they
    keep ignoring them. They are fresh programs, not forks: started after the handlers below exist,
    they would die of the USR1 that Slurm's launcher sends every process of the job step, and the
    next compile would fail ("Attempting to use a closed pool") instead of the run saving and stopping."""
    from torch._inductor.async_compile import maybe_warm_pool

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in SIGNALS}
    try:
        maybe_warm_pool()  # the pool of the inductor backend, which torch.compile uses by default
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopFlag:
    def __init__(self, compile_workers: bool = False) -> None:
        """compile_workers: the run uses torch.compile (see start_compile_workers)."""
        self.received: str | None = None
        if compile_workers:
            start_compile_workers()
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # A dedicated gloo group keeps this off the GPU even when the main backend is NCCL; it uses
        # GLOO_SOCKET_IFNAME (slurm/launch.sh sets it) and fails after minutes, not gloo's 30.
        self._group = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT) if distributed else None
        self._pending: tuple[torch.Tensor, dist.Work] | None = None
        margin = os.environ.get(MARGIN_ENV, "")
        self.margin_seconds = float(margin) if margin.replace(".", "", 1).isdigit() else None
        self._warned = False

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """Call once per step on every rank; True on all ranks at the same step."""
        if self._group is None:
            return self.received is not None
        local = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        decided = False
        if self._pending is not None:
            flag, work = self._pending
            work.wait()
            decided = bool(flag.item())
        if not decided:
            self._pending = (local, dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self._group, async_op=True))
        return decided

    def check_checkpoint_time(self, seconds: float, accelerator) -> None:
        """Warn (once) when a checkpoint takes more than half of the time a warning signal leaves: a job
        stopped at its time limit would then risk being killed before its checkpoint is complete."""
        if self.margin_seconds is None or seconds <= self.margin_seconds / 2 or self._warned:
            return
        self._warned = True
        accelerator.print(
            f"warning: saving a checkpoint took {seconds:.1f} s, more than half of the {self.margin_seconds:g} s "
            f"between the scheduler's warning signal and the time limit ({MARGIN_ENV}); a job stopped at its "
            f"limit may be killed before its checkpoint is complete: submit with a larger margin "
            f"(sbatch --signal=B:USR1@<seconds>, and {MARGIN_ENV} to match) or make checkpoints smaller")
