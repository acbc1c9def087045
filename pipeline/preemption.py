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

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75
"""Exit code after a signal-triggered checkpoint (EX_TEMPFAIL: run the same command again to resume)."""

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
MARGIN_ENV = "VAE_SIGNAL_MARGIN_SECONDS"
"""Seconds between the scheduler's warning signal and the hard kill (slurm/*.sbatch set it from their
`#SBATCH --signal=B:USR1@<seconds>` line; Slurm does not tell a job its own --signal)."""


class StopFlag:
    def __init__(self) -> None:
        self.received: str | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # A dedicated gloo group keeps this off the GPU even when the main backend is NCCL.
        self._group = dist.new_group(backend="gloo") if distributed else None
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
