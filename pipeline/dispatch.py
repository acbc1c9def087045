"""What a piece of torch code asks the device to do, seen from below autograd: every ATen operator it
dispatches, and the ones that make the host wait for the device (host syncs). Runs on any device, so a CPU
test can prove that a training step never synchronises on a GPU.

    with OpLog() as log:
        train_step(...)
    log.ops            # ATen operators that are not views (each is at least one kernel launch on a GPU)
    log.syncs          # [(operator, where in our code)] that read a device value on the host or copy
                       # host data to the device: .item()/bool()/float() of a tensor, torch.tensor(...)

A host sync is an operator in HOST_SYNCS: `_local_scalar_dense` (.item(), bool(), float(), int() and
Python control flow on a tensor), `lift_fresh`/`lift_fresh_copy` (a tensor made from Python data, such as
torch.tensor([[1.5]], device=cuda): a host-to-device copy that waits for the queue), and `_to_copy`/`copy_`
between two devices. `nonzero`, `masked_select` and friends need the host to size their output.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNCS = {"_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "nonzero", "masked_select",
              "unique", "_unique2", "repeat_interleave"}
"""Operators that make the host wait for the device (their output or its size comes from device data)."""


class OpLog(TorchDispatchMode):
    """Counts the non-view ATen operators dispatched inside the block, by name, and lists the host syncs
    with the innermost frame of the project's code (or the library) that caused each."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.syncs: list[tuple[str, str]] = []

    @property
    def ops(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not func.is_view:
            self.counts[name] += 1
        if name in HOST_SYNCS or (name in ("_to_copy", "copy_") and _crosses_devices(name, args, kwargs)):
            self.syncs.append((name, _caller()))
        return out


def _crosses_devices(name: str, args, kwargs) -> bool:
    if name == "copy_":
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and src.device != dst.device and src.dim() > 0
    device = kwargs.get("device")
    return device is not None and torch.device(device) != args[0].device


_PLUMBING = ("torch/utils/_python_dispatch", "torch/_compile.py", "torch/_ops.py", "torch/utils/_contextlib",
             "torch/_tensor.py", "torch/overrides.py", "torch/_dynamo/eval_frame.py", "pipeline/dispatch.py")


def _caller() -> str:
    """'pipeline/module.py:LINE' of the innermost frame of ours, then '-> library/file.py:LINE' where a
    library's own code made the operator (e.g. kornia building a tensor from a Python float)."""
    frames = [f for f in traceback.extract_stack() if not any(p in f.filename for p in _PLUMBING)]
    ours = [f for f in frames if "/pipeline/" in f.filename or "/benchmarks/" in f.filename]
    f = (ours or frames)[-1]
    lib = [g for g in frames[frames.index(f) + 1:] if "site-packages" in g.filename]
    where = f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
    return where + (f" -> {lib[-1].filename.split('site-packages/')[-1]}:{lib[-1].lineno}" if lib else "")
