"""The GPU path, measured (`make bench-gpu`): images/s per GPU, MFU, data-wait fraction and peak memory of
the flowers recipe's training step in fp32 / bf16 / fp16, compile on/off, channels_last on/off and the
adversarial stage on/off, as one table. One command, under 5 minutes on one GPU:

    python benchmarks/bench_gpu.py                      # 128 px shards from generated images, then the table
    python benchmarks/bench_gpu.py --full               # every combination (24 rows; ~15 min with compiles)
    python benchmarks/bench_gpu.py --device cpu --quick # a seconds-long smoke run of the same code (tests)

It builds 128 px shards from pipeline.demo_data's generated flowers (once; reused from --work), then
runs each configuration in this process through the trainer's own code: pipeline.step.build_training,
the real data stream (TrainStream, the recipe's workers), train_step, the discriminator's step when the
adversarial stage is on, and the EMA update. Each row: `--warmup` steps (compilation happens there),
then `--steps` timed steps ended by a device sync.

- images/s per GPU: timed steps x batch_size_per_device / wall time.
- MFU: model FLOPs per image (pipeline.models.training_flops_per_image for the VAE; with the adversarial
  stage plus 9 discriminator forwards per image: forward + input-gradient backward in the generator step,
  forward + backward on the real and the fake in its own step) x images/s / the GPU's dense bf16 peak
  (pipeline/train.py's table; for fp32 rows it is still the bf16 peak, so they show what fp32 leaves on
  the table). Blank on GPUs not in the table and on CPU.
- data wait: the fraction of the timed wall time the loop spent waiting for the next batch, as train.py
  logs it (train/data_wait_fraction).
- peak memory: torch.cuda.max_memory_allocated over the row (CPU: the process's peak RSS so far).

The perceptual backbone runs with random weights (loss.perceptual.weights=none): the same FLOPs as the
pretrained one, and nothing to download on an offline GPU node.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

MINIMAL_ROWS = [  # (mixed_precision, compile, channels_last, adversarial): one change at a time from bf16
    ("no", False, False, False),
    ("fp16", False, False, False),
    ("bf16", False, False, False),
    ("bf16", False, True, False),
    ("bf16", True, False, False),
    ("bf16", True, True, False),
    ("bf16", False, False, True),
    ("fp16", False, False, True),
    ("bf16", True, True, True),
]
QUICK_ROWS = [("no", False, False, False), ("bf16", False, True, True)]


@dataclass
class Row:
    precision: str
    compile: bool
    channels_last: bool
    adversarial: bool
    images_per_second: float = float("nan")
    mfu: float | None = None
    data_wait: float = float("nan")
    peak_memory_gb: float = float("nan")
    seconds: float = float("nan")
    error: str = ""


def build_shards(work: Path, size: int, count: int) -> Path:
    """Generated flowers sharded at `size` px under work/ (reused when already complete)."""
    from pipeline.demo_data import generate
    from pipeline.shards import write_shards

    shards = work / "shards" / f"bench{size}"
    if (shards / "manifest.json").is_file():
        manifest = json.loads((shards / "manifest.json").read_text())
        if manifest.get("size") == size and sum(s["count"] for s in manifest["splits"].values()) >= count * 0.9:
            return shards
    images = work / f"images{count}"
    generate(images, count=count, size=max(2 * size, 160), log=lambda *a: None)
    write_shards(images, work / "shards", name=f"bench{size}", size=size, progress=False, log=lambda *a: None)
    return shards


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _disc_forward_flops(disc: torch.nn.Module, image_size: int, channels: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        disc(torch.zeros(1, channels, image_size, image_size, device=next(disc.parameters()).device))
    return counter.get_total_flops()


def run_row(row: Row, recipe: str, overrides: list[str], shards: Path, device: str, steps: int, warmup: int) -> Row:
    from accelerate import Accelerator

    from pipeline.config import load_config
    from pipeline.data import TrainStream, read_manifest
    from pipeline.models import training_flops_per_image
    from pipeline.step import build_training, discriminator_step, train_step
    from pipeline.train import _peak_flops

    cfg = load_config(recipe, [f"data.shards={shards}", "loss.perceptual.weights=none",
                               f'train.mixed_precision="{row.precision}"', f"train.compile={row.compile}",
                               f"train.channels_last={row.channels_last}", "train.grad_accum_steps=1",
                               *([] if row.adversarial else ["loss.adversarial.weight=0"]),
                               *(["loss.adversarial.weight=0.5"] if row.adversarial else []),
                               "loss.adversarial.disc_start=0", "loss.adversarial.disc_warmup_steps=0",
                               *overrides])
    _reset_accelerate()
    torch._dynamo.reset()
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=cfg.train.mixed_precision)
    dev = accelerator.device
    size = read_manifest(cfg.data.shards)["size"]
    torch.manual_seed(0)
    t = build_training(cfg, accelerator, size)
    flops = training_flops_per_image(t.vae, size)
    if t.adversary is not None:
        flops += 9 * _disc_forward_flops(t.adversary.disc, size, cfg.model.in_channels)
    stream = iter(TrainStream(cfg, 0, 1))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)

    def one(step: int) -> float:
        t0 = time.perf_counter()
        images = next(stream).images.to(dev, non_blocking=True)
        waited = time.perf_counter() - t0
        images = t.augment(images, train=True).contiguous(memory_format=t.memory_format)
        result = train_step(t, accelerator, [images], step, cfg)
        if t.adversary is not None:
            discriminator_step(t.adversary, accelerator, [images], result.fakes, step)
        if t.ema is not None:
            t.ema.update(t.vae, step + 1, result.ok)
        return waited

    for step in range(warmup):  # compilation, allocator and cuDNN autotuning happen here
        one(step)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start, waited = time.perf_counter(), 0.0
    for step in range(warmup, warmup + steps):
        waited += one(step)
    if dev.type == "cuda":
        torch.cuda.synchronize()  # the queued kernels belong to the timed steps
    seconds = time.perf_counter() - start
    row.seconds = seconds
    row.images_per_second = steps * cfg.data.batch_size_per_device / seconds
    row.data_wait = waited / seconds
    peak = _peak_flops(dev)
    row.mfu = flops * row.images_per_second / peak if peak else None
    row.peak_memory_gb = (torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda"
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    accelerator.free_memory()
    return row


def table(rows: list[Row], device_name: str, note: str) -> str:
    lines = [f"device: {device_name}; {note}", "",
             "| precision | compile | channels_last | adversarial | images/s per GPU | MFU | data wait | peak memory GB |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.precision} | {r.compile} | {r.channels_last} | {r.adversarial} | failed: {r.error} | | | |")
            continue
        mfu = f"{100 * r.mfu:.1f} %" if r.mfu is not None else "-"
        lines.append(f"| {r.precision} | {'on' if r.compile else 'off'} | {'on' if r.channels_last else 'off'} | "
                     f"{'on' if r.adversarial else 'off'} | {r.images_per_second:.1f} | {mfu} | "
                     f"{100 * r.data_wait:.1f} % | {r.peak_memory_gb:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe, e.g. data.batch_size_per_device=128")
    p.add_argument("--recipe", default="recipes/flowers_gan.yaml",
                   help="flowers recipe with loss.adversarial (rows without it set its weight to 0)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="smoke run: 32 px, a tiny model, 2 rows, 2 steps")
    p.add_argument("--full", action="store_true", help="every combination of the four switches (24 rows)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per row (30)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per row, compilation included (10)")
    p.add_argument("--images", type=int, default=1024, help="generated images to shard (1024)")
    p.add_argument("--work", default="runs/bench-gpu", help="folder for the generated images and shards")
    p.add_argument("--shards", help="use these shards instead of generating them")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: make bench-gpu needs a CUDA GPU and torch sees none here; run it on a GPU node "
              "(or `python benchmarks/bench_gpu.py --device cpu --quick` for a smoke run).", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    size, rows_spec = 128, MINIMAL_ROWS
    if args.full:
        rows_spec = [(p_, c, cl, a) for p_ in ("no", "bf16", "fp16") for c in (False, True)
                     for cl in (False, True) for a in (False, True)]
    if args.quick:
        size, rows_spec = 32, QUICK_ROWS
        args.steps, args.warmup, args.images = min(args.steps, 2), min(args.warmup, 1), min(args.images, 48)
        overrides = ["model.channels=[8,16]", "model.latent_dim=8", "data.batch_size_per_device=4",
                     "data.num_workers=0", "loss.perceptual.weight=0", "loss.adversarial.disc_channels=8",
                     "loss.adversarial.disc_layers=2", *overrides]
    work = Path(args.work)
    t0 = time.perf_counter()
    shards = Path(args.shards) if args.shards else build_shards(work, size, args.images)
    print(f"shards: {shards} ({time.perf_counter() - t0:.0f} s)", flush=True)

    rows = []
    for precision, compile_, channels_last, adversarial in rows_spec:
        row = Row(precision, compile_, channels_last, adversarial)
        started = time.perf_counter()
        try:
            run_row(row, args.recipe, overrides, shards, args.device, args.steps, args.warmup)
        except Exception as e:  # noqa: BLE001 - a row that fails (e.g. out of memory) is reported, not fatal
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        rows.append(row)
        gc.collect()  # the row's trainer is gone with run_row's frame: free it before the next row
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(f"  {precision:4s} compile={compile_!s:5s} channels_last={channels_last!s:5s} "
              f"adversarial={adversarial!s:5s} {row.images_per_second:8.1f} images/s "
              f"({time.perf_counter() - started:.0f} s with warm-up){'  ' + row.error if row.error else ''}",
              flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    from pipeline.config import load_config

    batch = load_config(args.recipe, [f"data.shards={shards}", *overrides]).data.batch_size_per_device
    note = (f"recipe {args.recipe} {' '.join(overrides)}, {size} px, batch {batch} per GPU, "
            f"{args.steps} timed steps after {args.warmup}; total {time.perf_counter() - t0:.0f} s")
    print()
    print(table(rows, name, note))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "note": note, "rows": [r.__dict__ for r in rows]}, indent=1))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
