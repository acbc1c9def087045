"""Overhead of the pipeline's training step over a bare PyTorch loop (`make bench-train`).

Both sides train the same model with the same loss on the same in-memory batch (so data loading is
out of the picture), under the recipe's precision and memory format, with a fused AdamW: the bare loop
is forward, loss, backward, clip, optimizer step; the pipeline side is exactly what pipeline/train.py
runs per step (Accelerate-prepared module, device augmentation, the non-finite skip with BatchNorm
statistics put back, EMA update, device-side metric accumulation).

Two measures, both printed as pipeline / bare ratios from one run:
- ATen operators per step that are not views (pipeline.dispatch.OpLog), and the step's host syncs. On a
  GPU each operator is at least one kernel launch, and where a small model's step is launch-bound (the
  flowers recipe at batch 64 on an H200) the time follows the count; the count is exact and the same on
  any machine, so it is the proxy a CPU can check (goal <= 1.10; tests/test_step.py holds it).
- images/s: blocks of steps alternate between the two so machine noise hits both alike; the ratio of
  medians is printed.

    python benchmarks/bench_train.py [recipe] [key=value ...] [--steps 20 --rounds 5] [--ops-only]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator

from pipeline.config import Config, load_config
from pipeline.dispatch import OpLog
from pipeline.meters import IntervalMeter
from pipeline.models import build_model
from pipeline.objective import VAELoss
from pipeline.step import build_training, discriminator_step, train_step

OPS_GOAL = 1.10


def bare_step_fn(cfg: Config, batch_u8: torch.Tensor, device: torch.device) -> Callable[[int], None]:
    """The same model, loss and batch in a bare loop: no Accelerate, augmentation, EMA, metrics or skip."""
    size = batch_u8.shape[-1]
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = build_model(cfg.model, size).to(device, memory_format=memory_format)
    loss = VAELoss(cfg.loss, model.output_range, cfg.model.in_channels).to(device)
    params = list(model.parameters()) + [p for p in loss.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, fused=True)
    low, high = model.output_range
    x = (batch_u8.float() / 255 * (high - low) + low).contiguous(memory_format=memory_format)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            total = loss(model(x), x, i).total
        (scaler.scale(total) if scaler else total).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm or float("inf"))
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def pipeline_step_fn(cfg: Config, accelerator: Accelerator, batch_u8: torch.Tensor) -> Callable[[int], None]:
    """What pipeline/train.py runs per training step (the discriminator's step too when it is on)."""
    t = build_training(cfg, accelerator, batch_u8.shape[-1])
    meter = IntervalMeter()

    def step(i: int) -> None:
        images = t.augment(batch_u8, train=True).contiguous(memory_format=t.memory_format)
        result = train_step(t, accelerator, [images], i, cfg)
        if t.adversary is not None and t.adversary.schedule.disc_active(i):
            d = discriminator_step(t.adversary, accelerator, [images], result.fakes, i)
            meter.add({**d.terms, "gan_grad_norm": d.grad_norm}, d.nonfinite, d.ok, training_step=False)
        if t.ema is not None:
            t.ema.update(t.vae, i + 1, result.ok)
        meter.add({**result.terms, "grad_norm": result.grad_norm}, result.nonfinite, result.ok)

    step.read = lambda: meter.read(accelerator)  # as a logging step would: the one host sync
    return step


def op_log(step: Callable[[int], None], warmup: int = 2) -> OpLog:
    """The operators and host syncs of one step after `warmup` steps (lazy init, first-step-only work)."""
    for i in range(warmup):
        step(i)
    with OpLog() as log:
        step(warmup)
    return log


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", nargs="?", default="recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks per side")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--ops-only", action="store_true", help="count operators, skip the timing")
    args = parser.parse_args()
    cfg = load_config(args.recipe, args.overrides, check_paths=False)
    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    device = accelerator.device
    batch_u8 = torch.randint(0, 256, (cfg.data.batch_size_per_device, 3, args.image_size, args.image_size),
                             dtype=torch.uint8, device=device)
    bare_step = bare_step_fn(cfg, batch_u8, device)
    pipeline_step = pipeline_step_fn(cfg, accelerator, batch_u8)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads), recipe {args.recipe} {' '.join(args.overrides)}, "
          f"batch {cfg.data.batch_size_per_device}, {args.image_size} px, {cfg.train.mixed_precision}, "
          f"channels_last {cfg.train.channels_last}")

    bare_ops, ours_ops = op_log(bare_step), op_log(pipeline_step)
    extra = ours_ops.counts - bare_ops.counts
    print(f"ATen ops per step (not views): bare {bare_ops.ops}, pipeline {ours_ops.ops}: "
          f"{ours_ops.ops / bare_ops.ops:.3f}x (goal <= {OPS_GOAL:.2f}); the pipeline's extra: "
          + ", ".join(f"{k} {v}" for k, v in extra.most_common(8)))
    print(f"host syncs in the pipeline step: {len(ours_ops.syncs)}"
          + "".join(f"\n  {op} at {where}" for op, where in ours_ops.syncs))
    if args.ops_only:
        return

    def timed(fn) -> float:
        start = time.perf_counter()
        for i in range(args.steps):
            fn(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps * cfg.data.batch_size_per_device / (time.perf_counter() - start)

    timed(bare_step), timed(pipeline_step)  # warm-up (allocator, kernels)
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(timed(bare_step))
        ours.append(timed(pipeline_step))
        pipeline_step.read()
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"bare PyTorch loop:   {b:8.1f} images/s (median of {args.rounds} blocks of {args.steps} steps)")
    print(f"pipeline train step: {o:8.1f} images/s")
    print(f"overhead: {100 * (b / o - 1):+.1f} %  (goal <= 5 % on a GPU)")


if __name__ == "__main__":
    main()
