"""The largest per-device batch size that fits, for a recipe's model, loss, optimizer and precision.

    python -m pipeline.batchsize recipes/flowers.yaml [key=value ...]            # on the GPU, or the CPU
    python -m pipeline.batchsize recipes/demo.yaml --budget-gb 4 --max 4096      # a CPU (or GPU) memory budget
    python -m pipeline.batchsize recipes/demo.yaml --probe 256                   # one step at 256: its peak memory

What one try measures is a real training step of pipeline.train (TrainModule forward + backward, gradient
clipping, the fused optimizer step and the EMA update, under the recipe's mixed precision, channels_last
and torch.compile) on a batch of random images of the shards' size. The data loader's worker processes
are not part of it.

Search (the same on both devices): batch sizes 1, 2, 4, ... until one does not fit, then bisection between
the last that fitted and the first that did not. A try "fits" when it runs and its peak memory is within
the budget:
- GPU: the step runs without torch.OutOfMemoryError (caught; the cache is emptied before the next try), and,
  with --budget-gb, torch.cuda.max_memory_reserved() is within it. The figure printed is that peak.
- CPU: the peak resident set size (VmHWM) is within the budget, by default BUDGET_FRACTION of the memory this
  process could have: its own RSS plus what the system reports available (/proc/meminfo MemAvailable, or
  the cgroup limit when that is lower). The search runs in this process, resetting the peak before each try
  (/proc/self/clear_refs, after malloc_trim, with a fixed glibc mmap threshold so big freed tensors leave
  RSS). Its answer is then checked in a fresh `--probe` process with the allocator's defaults, as training
  runs, doing STEPS_PER_PROBE steps, and stepped down until that fresh process's whole peak (imports, setup,
  steps) is within the budget: the figure printed is that verified peak. Where the peak RSS cannot be reset,
  every try runs in a fresh process.
A try whose memory, extrapolated linearly from the tries before it, would exceed the budget by more than
SKIP_MARGIN is counted as not fitting without running it, so a CPU search never asks for far more memory
than there is.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from pipeline.config import Config, load_config
from pipeline.errors import UserError, exit_on_user_error
from pipeline.data import read_manifest
from pipeline.step import build_training, discriminator_step, train_step

BUDGET_FRACTION = 0.8
"""Default CPU budget: this share of the memory the process could use (the rest is headroom)."""
STEPS_PER_PROBE = 2
"""Training steps a fresh --probe process runs: the second one runs on top of the optimizer state and the
memory the first left behind, as every later step of training does."""
RSS_JITTER_BYTES = 16 * 2**20
"""Headroom kept by the fresh-process check: the peak RSS of identical fresh processes differs run to run by
a few MB, with outliers of ~15 MB measured here; an answer verified right at the budget can exceed it next run."""
VERIFY_STEP_FRACTION = 0.03
"""When the answer does not fit in a fresh process, step down by at least this share of it."""
SKIP_MARGIN = 1.25
"""A try predicted to need more than this times the budget is not run."""
GB = 2**30


# --------------------------------------------------------------------------------------------
# Memory on the CPU
# --------------------------------------------------------------------------------------------


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field_name}")


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident set size (since start or the last reset_peak_rss())."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Set the peak RSS to the current RSS (Linux >= 4.0). False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD_BYTES = 1 << 20


def _return_big_frees_to_the_os() -> None:
    """glibc raises its mmap threshold (up to 32 MB) after big frees and then keeps such blocks on the heap,
    so a large step leaves RSS high and the next, smaller try would be measured on top of it. A fixed 1 MB
    threshold makes every big tensor its own mapping, returned to the OS when freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def _release_freed_memory() -> None:
    gc.collect()
    try:  # glibc keeps freed heap pages; malloc_trim hands them back so RSS is what is really in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_bytes() -> int:
    """Memory this process could hold: its RSS plus what the system (or its cgroup) has available."""
    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024
               for line in Path("/proc/meminfo").read_text().splitlines() if line.split()[1:]}
    free = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            free = min(free, int(limit) - usage)
        break
    return rss_bytes() + max(0, free)


# --------------------------------------------------------------------------------------------
# One training step at a given batch size
# --------------------------------------------------------------------------------------------


class StepProbe:
    """The recipe's training setup, built once; peak_bytes(b) runs one real training step at batch b."""

    def __init__(self, cfg: Config, image_size: int):
        self.cfg, self.image_size = cfg, image_size
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
        self.device = self.accelerator.device
        self.t = t = build_training(cfg, self.accelerator, image_size)
        self.augment, self.memory_format, self.ema = t.augment, t.memory_format, t.ema
        self.module, self.optimizer = t.module, t.optimizer
        self.cuda = self.device.type == "cuda"

    def step(self, batch_size: int) -> None:
        c = self.cfg.model.in_channels
        images = torch.randint(0, 256, (batch_size, c, self.image_size, self.image_size), dtype=torch.uint8,
                               device=self.device)
        x = self.augment(images, train=True).contiguous(memory_format=self.memory_format)
        adversary = self.t.adversary  # the heaviest step: both stages on (after disc_start + warm-up)
        step = adversary.schedule.gen_start if adversary is not None else 0
        result = train_step(self.t, self.accelerator, [x], step, self.cfg)
        if adversary is not None:
            discriminator_step(adversary, self.accelerator, [x], result.fakes, step)
        if self.ema is not None:
            self.ema.update(self.t.vae, 1, result.ok)
        result.terms["total"].item()  # wait for the device: the step is complete when we measure

    def peak_bytes(self, batch_size: int, steps: int = 1) -> int | None:
        """Peak memory of `steps` training steps at `batch_size` (GPU: reserved by torch's caching allocator;
        CPU: the process's RSS), or None when the GPU ran out of memory."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            out_of_memory = False
            try:
                for _ in range(steps):
                    self.step(batch_size)
            except torch.OutOfMemoryError:
                out_of_memory = True
            if out_of_memory:  # outside the except block: its traceback no longer holds the step's tensors
                self.optimizer.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
                return None
            return torch.cuda.max_memory_reserved(self.device)
        _release_freed_memory()
        if not reset_peak_rss():
            raise OSError("cannot reset the peak RSS (/proc/self/clear_refs)")
        for _ in range(steps):
            self.step(batch_size)
        return peak_rss_bytes()


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    batch_size: int
    """The largest batch size that fitted (0: not even 1)."""
    peak_bytes: int | None
    """Peak memory of the step at batch_size."""
    budget_bytes: float
    tried: dict[int, int | None] = field(default_factory=dict)
    """batch size -> peak bytes (None: out of memory, or skipped as predicted over the budget)."""


def _predict(tried: dict[int, int | None], b: int) -> float | None:
    """Peak memory at b extrapolated from the two largest measured tries (memory is close to affine in b)."""
    points = sorted((k, v) for k, v in tried.items() if v is not None)
    if len(points) < 2:
        return None
    (b1, p1), (b2, p2) = points[-2], points[-1]
    return p2 + (p2 - p1) / (b2 - b1) * (b - b2)


def largest_batch(peak: Callable[[int], int | None], budget_bytes: float, limit: int,
                  log: Callable[[str], None] = lambda s: None) -> SearchResult:
    """Doubling from 1, then bisection: the largest b <= limit with peak(b) not None and <= budget_bytes."""
    result = SearchResult(0, None, budget_bytes)

    def fits(b: int) -> bool:
        predicted = _predict(result.tried, b)
        if predicted is not None and predicted > SKIP_MARGIN * budget_bytes:
            result.tried[b] = None
            log(f"  batch {b}: skipped, predicted {predicted / GB:.2f} GB")
            return False
        p = peak(b)
        result.tried[b] = p
        ok = p is not None and p <= budget_bytes
        log(f"  batch {b}: " + ("out of memory" if p is None else f"{p / GB:.3f} GB") + ("" if ok else "  (too big)"))
        if ok and b > result.batch_size:
            result.batch_size, result.peak_bytes = b, p
        return ok

    lo, hi, b = 0, None, 1
    while b <= limit:
        if not fits(b):
            hi = b
            break
        lo, b = b, b * 2
    if hi is None:  # every power of two up to the limit fitted: then the limit itself, or bisect below it
        if lo == limit or fits(limit):
            return result
        hi = limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return result


def fresh_process_peak(cli_args: list[str]) -> Callable[[int], int | None]:
    """peak(b): the whole peak memory of a new `python -m pipeline.batchsize ... --probe b` process, i.e. of
    a training process (imports, setup, STEPS_PER_PROBE steps at b) with the allocator's default behaviour."""

    def peak(b: int) -> int | None:
        r = subprocess.run([sys.executable, "-m", "pipeline.batchsize", *cli_args, "--probe", str(b), "--json"],
                           capture_output=True, text=True)
        if r.returncode != 0:  # killed for memory, or out of memory on the GPU
            return None
        return json.loads(r.stdout.strip().splitlines()[-1])["peak_bytes"]

    return peak


def verify(result: SearchResult, peak: Callable[[int], int | None], log: Callable[[str], None]) -> SearchResult:
    """Re-measure the answer with `peak` (a fresh process) and step down while it exceeds the budget less
    RSS_JITTER_BYTES of headroom, by the overshoot divided by the memory per image the search measured
    (at least VERIFY_STEP_FRACTION of it).
    Sets result.peak_bytes to the verified peak."""
    b = result.batch_size
    points = sorted((k, v) for k, v in result.tried.items() if v is not None)
    per_image = max(1.0, (points[-1][1] - points[0][1]) / max(1, points[-1][0] - points[0][0])) if points else 1.0
    target = result.budget_bytes - min(RSS_JITTER_BYTES, 0.1 * result.budget_bytes)
    while b >= 1:
        p = peak(b)
        log(f"  batch {b} in a fresh process: " + ("failed" if p is None else f"{p / GB:.3f} GB"))
        if p is not None and p <= target:
            result.batch_size, result.peak_bytes = b, p
            return result
        # Fresh processes differ by a few MB run to run: step at least VERIFY_STEP_FRACTION of b, not 1.
        over = 0 if p is None else math.ceil((p - target) / per_image)
        b = b // 2 if p is None else b - max(1, over, math.ceil(VERIFY_STEP_FRACTION * b))
    result.batch_size, result.peak_bytes = 0, None
    return result


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.batchsize",
                                description="Largest per-device batch size that fits the recipe's training step.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--budget-gb", type=float, help=f"memory budget (default CPU: {BUDGET_FRACTION} x available; "
                                                   f"GPU: none, out-of-memory decides)")
    p.add_argument("--max", type=int, default=65536, dest="limit", help="largest batch size to try")
    p.add_argument("--image-size", type=int, help="image side in px (default: the manifest of data.shards)")
    p.add_argument("--probe", type=int, metavar="B",
                   help=f"only run {STEPS_PER_PROBE} training steps at batch B in this process and report its peak")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_intermixed_args(argv)
    cfg = load_config(args.recipe, args.overrides, check_paths=args.image_size is None)
    if args.image_size is None:
        image_size = int(read_manifest(cfg.data.shards)["size"])
    else:
        image_size = args.image_size
    if args.limit < 1 or (args.probe is not None and args.probe < 1):
        raise UserError("--max and --probe must be at least 1")
    probe = StepProbe(cfg, image_size)
    device = probe.device

    if args.probe is not None:
        # A fresh process as training would run it: its whole peak (imports and setup included) counts.
        if probe.cuda:
            peak = probe.peak_bytes(args.probe, steps=STEPS_PER_PROBE)
        else:
            for _ in range(STEPS_PER_PROBE):
                probe.step(args.probe)
            peak = peak_rss_bytes()
        out = {"batch_size": args.probe, "peak_bytes": peak, "device": str(device), "image_size": image_size}
        print(json.dumps(out) if args.json else
              f"batch {args.probe}: " + ("out of memory" if peak is None else f"peak {peak / GB:.3f} GB"))
        return out

    if args.budget_gb is not None:
        budget = args.budget_gb * GB
    else:
        budget = math.inf if probe.cuda else BUDGET_FRACTION * available_bytes()
    log = (lambda s: None) if args.json else print
    what = "out-of-memory" if math.isinf(budget) else f"a {budget / GB:.2f} GB budget"
    log(f"searching the largest batch_size_per_device for {args.recipe} on {device} "
        f"({image_size} px, precision {cfg.train.mixed_precision}) against {what}")
    fresh = fresh_process_peak([args.recipe, *args.overrides, "--image-size", str(image_size)])
    if probe.cuda:
        peak_fn = probe.peak_bytes  # out of memory is caught in-process; the caching allocator is emptied per try
    elif reset_peak_rss():
        _return_big_frees_to_the_os()  # clean per-try peaks in this process; the answer is verified fresh below
        peak_fn = probe.peak_bytes
    else:
        peak_fn = fresh  # no way to reset the peak RSS here: every try in its own process
    result = largest_batch(peak_fn, budget, args.limit, log)
    if not probe.cuda and result.batch_size > 0:
        result = verify(result, fresh, log)
    out = {"batch_size": result.batch_size, "peak_bytes": result.peak_bytes,
           "budget_bytes": None if math.isinf(budget) else int(budget), "device": str(device),
           "image_size": image_size, "mixed_precision": cfg.train.mixed_precision,
           "tried": {str(k): v for k, v in sorted(result.tried.items())}}
    if result.batch_size == 0:
        raise UserError(f"not even a batch of 1 fits on {device} ({what}); use a smaller model, image size "
                          f"or train.mixed_precision=bf16")
    if args.json:
        print(json.dumps(out))
    else:
        limit_note = " (the --max limit)" if result.batch_size == args.limit else ""
        print(f"largest data.batch_size_per_device: {result.batch_size}{limit_note}, peak memory "
              f"{result.peak_bytes / GB:.3f} GB" + ("" if math.isinf(budget) else f" of {budget / GB:.3f} GB"))
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
