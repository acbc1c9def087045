"""Fault injection for the tests of exact resume and failure handling.

    VAE_KILL_AT=checkpoint@8 python pipeline/train.py ...   # SIGKILL the run while it writes step 8's checkpoint

With VAE_KILL_AT=<point>@<step> in the environment, the main process, when it first reaches <point>
at optimizer step <step>, SIGKILLs its launcher (under torchrun / accelerate launch --multi_gpu) and
itself: the other ranks and the data workers must then die with their parents, as on a node
failure. Points:

    step              right after the optimizer step, before logging (mid-interval)
    checkpoint        inside a save: every rank's files written, before the commit
    after-checkpoint  right after `latest` moved to the new checkpoint
    validation        after the first batch of a validation pass
    media             after the first media panel was written
    encode-unit       pipeline.encode: right after the main process committed its <step>-th unit

Unset (always, outside tests), `kill_at` is one dictionary lookup.

VAE_PAUSE_AT=<point>@<step>:<seconds> makes every process that reaches <point> at <step> sleep that
long there instead (a window in which a test's signal is sure to find work left to do; points "step"
and "encode-unit").
"""

from __future__ import annotations

import os
import signal
import time

from pipeline.runs import launched_by_torchrun

POINTS = ("step", "checkpoint", "after-checkpoint", "validation", "media", "encode-unit")
_SPEC = os.environ.get("VAE_KILL_AT", "")


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    point, _, step = spec.partition("@")
    if point not in POINTS or not step.isdigit():
        raise ValueError(f"VAE_KILL_AT={spec!r} must be <point>@<step> with point one of {', '.join(POINTS)}")
    return point, int(step)


_TARGET = _parse(_SPEC)


def kill_at(point: str, step: int, main_process: bool) -> None:
    """SIGKILL the launcher and this process if VAE_KILL_AT names (point, step) and this is the main process."""
    if _TARGET is None or _TARGET != (point, step) or not main_process:
        return
    if launched_by_torchrun():
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _parse_pause(spec: str) -> tuple[str, int, float] | None:
    if not spec:
        return None
    target, _, seconds = spec.partition(":")
    parsed = _parse(target)
    if parsed is None or not seconds.replace(".", "", 1).isdigit():
        raise ValueError(f"VAE_PAUSE_AT={spec!r} must be <point>@<step>:<seconds>")
    return (*parsed, float(seconds))


_PAUSE = _parse_pause(os.environ.get("VAE_PAUSE_AT", ""))


def pause_at(point: str, step: int) -> None:
    """Sleep if VAE_PAUSE_AT names (point, step)."""
    if _PAUSE is not None and _PAUSE[:2] == (point, step):
        time.sleep(_PAUSE[2])
