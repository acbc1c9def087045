"""Overhead of the pipeline's training step over a bare PyTorch loop (`make bench-train`).

Both sides train the same model with the same loss on the same in-memory batch (so data loading is
out of the picture): the bare loop is forward, loss, backward, clip, optimizer step; the pipeline side
is exactly what pipeline/train.py runs per step (Accelerate-prepared module, device augmentation,
the fused optimizer's non-finite skip, EMA update, device-side metric accumulation). Blocks of steps
alternate between the two so machine noise hits both alike; the ratio of medians is printed.

    python benchmarks/bench_train.py [recipe] [key=value ...] [--steps 20 --rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator

from pipeline.config import load_config
from pipeline.objective import VAELoss
from pipeline.meters import IntervalMeter
from pipeline.models import build_model
from pipeline.step import build_training, train_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", nargs="?", default="recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks per side")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    cfg = load_config(args.recipe, args.overrides, check_paths=False)
    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    device = accelerator.device
    batch_u8 = torch.randint(0, 256, (cfg.data.batch_size_per_device, 3, args.image_size, args.image_size),
                             dtype=torch.uint8, device=device)

    # --- bare PyTorch: the same model, loss and batch; no Accelerate, no EMA, no metrics.
    bare_model = build_model(cfg.model, args.image_size).to(device)
    bare_loss = VAELoss(cfg.loss, bare_model.output_range, cfg.model.in_channels).to(device)
    bare_opt = torch.optim.AdamW(list(bare_model.parameters()) + [p for p in bare_loss.parameters() if p.requires_grad],
                                 lr=cfg.optim.lr, fused=True)
    low, high = bare_model.output_range
    bare_x = batch_u8.float() / 255 * (high - low) + low
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")

    def bare_step(step: int) -> None:
        with autocast:
            total = bare_loss(bare_model(bare_x), bare_x, step).total
        total.backward()
        torch.nn.utils.clip_grad_norm_(bare_model.parameters(), cfg.optim.grad_clip_norm or float("inf"))
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    # --- the pipeline's step.
    t = build_training(cfg, accelerator, args.image_size)
    meter = IntervalMeter()

    def pipeline_step(step: int) -> None:
        images = t.augment(batch_u8, train=True)
        result = train_step(t, accelerator, [images], step, cfg)
        if t.ema is not None:
            t.ema.update(t.vae, step, result.ok)
        meter.add({**result.terms, "grad_norm": result.grad_norm}, result.nonfinite, result.ok)

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
        meter.read(accelerator)  # as a logging step would
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads), recipe {args.recipe} {' '.join(args.overrides)}, "
          f"batch {cfg.data.batch_size_per_device}, {args.image_size} px, {cfg.train.mixed_precision}")
    print(f"bare PyTorch loop:   {b:8.1f} images/s (median of {args.rounds} blocks of {args.steps} steps)")
    print(f"pipeline train step: {o:8.1f} images/s")
    print(f"overhead: {100 * (b / o - 1):+.1f} %  (goal <= 3 %)")


if __name__ == "__main__":
    main()
