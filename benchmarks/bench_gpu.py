"""The GPU path, measured (`make bench-gpu`): one command, one table, about 5 minutes on one GPU.

    python benchmarks/bench_gpu.py                        # the default rows within --budget-s (290)
    python benchmarks/bench_gpu.py --rows 'resnet|train'  # only rows whose name matches a regex
    python benchmarks/bench_gpu.py --full                 # + every precision/compile/channels_last/GAN grid row
    python benchmarks/bench_gpu.py --device cpu --quick   # a seconds-long smoke run of the same code (tests)

It builds 128 px shards from pipeline.demo_data's generated flowers (once; reused from --work), then runs
each row in this process through the trainer's own code: pipeline.step.build_training, the real data stream
(TrainStream, the recipe's workers), train_step, the discriminator's step when the adversarial stage is on,
and the EMA update. Rows run cheapest-first and stop at the time budget (the rest are listed as skipped).

Training rows (flowers = recipes/flowers_gan.yaml with the adversarial weight 0 unless "gan"; resnet_f8 =
recipes/resnet_f8.yaml; batch 64 per GPU): each `--warmup` steps (compilation, cuDNN autotuning and CUDA
graph capture happen there, reported as "warm-up s"), then `--steps` timed steps ended by a device sync.
- images/s per GPU: timed steps x batch / wall time.
- MFU: pipeline.flops's count of every network the step runs (VAE + perceptual backbone + discriminator)
  x images/s / the GPU's dense bf16 peak (for fp32 rows too). Blank on GPUs not in the table and on CPU.
- data wait: the fraction of the timed wall time spent waiting for the next batch (train/data_wait_fraction).
- peak memory: torch.cuda.max_memory_allocated over the row.

Other rows:
- "train step vs bare loop": benchmarks/bench_train.py's comparison on this GPU (the flowers recipe as
  shipped, bf16 + channels_last): a bare PyTorch loop's images/s against the pipeline step's, and the
  ATen operators per step of each (goal: <= 5 % slower, <= 1.10x the operators).
- "data cpu" / "data gpu": the TrainStream alone at 128 px: decoded by `--data-workers` CPU workers, or
  read by them and decoded by nvJPEG (data.decode=gpu); images/s and CPU microseconds per image (this
  process and its workers).

The perceptual backbone runs with random weights (loss.perceptual.weights=none): the same FLOPs as the
pretrained one, and nothing to download on an offline GPU node. JSON of every row goes to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

FLOWERS, RESNET = "recipes/flowers_gan.yaml", "recipes/resnet_f8.yaml"


@dataclass
class Row:
    name: str
    recipe: str = ""
    precision: str = "bf16"
    compile: str = "off"  # off | default | reduce-overhead | ...
    channels_last: bool = False
    adversarial: bool = False
    extra: list[str] = field(default_factory=list)  # further key=value overrides
    kind: str = "train"  # train | compare | data
    images_per_second: float = float("nan")
    mfu: float | None = None
    flops_per_image: dict | None = None
    warmup_seconds: float = float("nan")
    seconds: float = float("nan")
    data_wait: float = float("nan")
    peak_memory_gb: float = float("nan")
    detail: str = ""  # compare/data rows: what was measured
    error: str = ""


def default_rows(full: bool) -> list[Row]:
    """Cheapest first, so the budget cuts the compiled rows (a minute of warm-up each) last."""
    rows = [
        Row("flowers bf16 +cl (shipped)", FLOWERS, "bf16", channels_last=True),
        Row("flowers_gan bf16 +cl (shipped)", FLOWERS, "bf16", channels_last=True, adversarial=True),
        Row("resnet_f8 bf16", RESNET, "bf16"),
        Row("flowers bf16", FLOWERS, "bf16"),
        Row("flowers fp32 tf32 +cl", FLOWERS, "no", channels_last=True),
        Row("flowers fp32 ieee +cl", FLOWERS, "no", channels_last=True, extra=["train.tf32=false"]),
        Row("flowers fp16 +cl", FLOWERS, "fp16", channels_last=True),
        Row("train step vs bare loop", FLOWERS, "bf16", channels_last=True, kind="compare"),
        Row("data cpu", FLOWERS, kind="data", extra=["data.decode=cpu"]),
        Row("data gpu (nvJPEG)", FLOWERS, kind="data", extra=["data.decode=gpu"]),
        Row("resnet_f8 bf16 +compile (shipped)", RESNET, "bf16", compile="default"),
        Row("flowers bf16 +cl +compile reduce-overhead", FLOWERS, "bf16", "reduce-overhead", channels_last=True),
        Row("flowers bf16 +cl +compile", FLOWERS, "bf16", "default", channels_last=True),
        Row("resnet_f8 bf16 +compile reduce-overhead", RESNET, "bf16", "reduce-overhead"),
    ]
    if full:
        rows += [Row(f"flowers {p} {'+cl ' if cl else ''}{'+compile ' if c else ''}{'+gan' if a else ''}".strip(),
                     FLOWERS, p, "default" if c else "off", cl, a)
                 for p in ("no", "bf16", "fp16") for c in (False, True) for cl in (False, True) for a in (False, True)]
    return rows


QUICK_ROWS = [Row("flowers fp32", FLOWERS, "no"), Row("flowers_gan bf16 +cl", FLOWERS, "bf16", channels_last=True,
                                                       adversarial=True),
              Row("train step vs bare loop", FLOWERS, "bf16", kind="compare"), Row("data cpu", FLOWERS, kind="data")]
QUICK = ["model.channels=[8,16]", "model.latent_dim=8", "data.batch_size_per_device=4", "data.num_workers=0",
         "loss.perceptual.weight=0", "loss.adversarial.disc_channels=8", "loss.adversarial.disc_layers=2"]


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


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _config(row: Row, shards: Path, overrides: list[str]):
    from pipeline.config import load_config

    return load_config(row.recipe, [f"data.shards={shards}", "loss.perceptual.weights=none",
                                    f'train.mixed_precision="{row.precision}"', f"train.compile={row.compile != 'off'}",
                                    *([f"train.compile_mode={row.compile}"] if row.compile != "off" else []),
                                    f"train.channels_last={row.channels_last}", "train.grad_accum_steps=1",
                                    "loss.adversarial.disc_start=0", "loss.adversarial.disc_warmup_steps=0",
                                    f"loss.adversarial.weight={0.5 if row.adversarial else 0}",
                                    *overrides, *row.extra])


def _accelerator(device: str, precision: str):
    from accelerate import Accelerator

    reset_accelerate()
    torch._dynamo.reset()
    return Accelerator(cpu=device == "cpu", mixed_precision=precision)


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (the data workers), from /proc."""
    total = time.process_time()
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[1] == me:  # ppid
            total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_train(row: Row, shards: Path, overrides: list[str], device: str, steps: int, warmup: int) -> None:
    from pipeline.data import TrainStream, read_manifest
    from pipeline.flops import peak_flops, step_flops_per_image
    from pipeline.step import build_training, discriminator_step, train_step

    cfg = _config(row, shards, overrides)
    accelerator = _accelerator(device, cfg.train.mixed_precision)
    dev = accelerator.device
    size = read_manifest(cfg.data.shards)["size"]
    torch.manual_seed(0)
    t = build_training(cfg, accelerator, size)
    row.flops_per_image = step_flops_per_image(t.vae, t.loss, t.adversary.disc if t.adversary else None, size,
                                               r1=row.adversarial and cfg.loss.adversarial.r1_weight > 0)
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

    started = time.perf_counter()
    for step in range(warmup):  # compilation, cuDNN autotuning, CUDA graph capture
        one(step)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    row.warmup_seconds = time.perf_counter() - started
    start, waited = time.perf_counter(), 0.0
    for step in range(warmup, warmup + steps):
        waited += one(step)
    if dev.type == "cuda":
        torch.cuda.synchronize()  # the queued kernels belong to the timed steps
    row.seconds = time.perf_counter() - start
    row.images_per_second = steps * cfg.data.batch_size_per_device / row.seconds
    row.data_wait = waited / row.seconds
    peak = peak_flops(dev)
    row.mfu = row.flops_per_image["total"] * row.images_per_second / peak if peak else None
    row.peak_memory_gb = (torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda"
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    accelerator.free_memory()


def run_compare(row: Row, shards: Path, overrides: list[str], device: str, steps: int, warmup: int) -> None:
    """bench_train's bare loop vs pipeline step: alternating blocks, ratio of medians; and operators per step."""
    from bench_train import bare_step_fn, op_log, pipeline_step_fn

    from pipeline.data import read_manifest

    cfg = _config(row, shards, overrides)
    accelerator = _accelerator(device, cfg.train.mixed_precision)
    dev = accelerator.device
    size = read_manifest(cfg.data.shards)["size"]
    batch = torch.randint(0, 256, (cfg.data.batch_size_per_device, 3, size, size), dtype=torch.uint8, device=dev)
    bare, ours = bare_step_fn(cfg, batch, dev), pipeline_step_fn(cfg, accelerator, batch)
    ops = (op_log(bare).ops, op_log(ours).ops)

    def timed(fn) -> float:
        start = time.perf_counter()
        for i in range(steps):
            fn(i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return steps * cfg.data.batch_size_per_device / (time.perf_counter() - start)

    started = time.perf_counter()
    for _ in range(max(1, warmup // 5)):
        timed(bare), timed(ours)
    row.warmup_seconds = time.perf_counter() - started
    b, o = [], []
    for _ in range(3):
        b.append(timed(bare))
        o.append(timed(ours))
        ours.read()
    row.images_per_second = statistics.median(o)
    row.detail = (f"bare loop {statistics.median(b):.0f} images/s, pipeline {row.images_per_second:.0f}: "
                  f"{100 * (statistics.median(b) / row.images_per_second - 1):+.1f} % (goal <= 5 %); operators "
                  f"per step {ops[1]} vs {ops[0]}: {ops[1] / ops[0]:.2f}x (goal <= 1.10)")
    accelerator.free_memory()


def run_data(row: Row, shards: Path, overrides: list[str], device: str, workers: int, seconds: float) -> None:
    from pipeline.data import TrainStream

    cfg = _config(row, shards, [*overrides, f"data.num_workers={workers}"])
    if cfg.data.decode == "gpu" and device != "cuda":
        row.error = "skipped: nvJPEG needs CUDA"
        return
    stream = iter(TrainStream(cfg, 0, 1))
    started = time.perf_counter()
    for _ in range(3):
        next(stream)
    row.warmup_seconds = time.perf_counter() - started
    cpu0, t0, n = _cpu_seconds(), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        n += next(stream).images.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    row.seconds = time.perf_counter() - t0
    row.images_per_second = n / row.seconds
    row.detail = (f"{cfg.data.num_workers} workers, decode={cfg.data.decode}: "
                  f"{1e6 * (_cpu_seconds() - cpu0) / n:.0f} CPU us per image")
    del stream
    gc.collect()


def table(rows: list[Row], device_name: str, note: str) -> str:
    lines = [f"device: {device_name}; {note}", "",
             "| row | images/s per GPU | MFU (VAE+perceptual+disc) | warm-up s | data wait | peak memory GB | notes |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | | | | | | {r.error} |")
            continue
        mfu = f"{100 * r.mfu:.1f} %" if r.mfu is not None else "-"
        wait = f"{100 * r.data_wait:.1f} %" if r.data_wait == r.data_wait else ""
        memory = f"{r.peak_memory_gb:.2f}" if r.peak_memory_gb == r.peak_memory_gb else ""
        flops = (f"{r.flops_per_image['total'] / 1e9:.2f} GFLOP/image" if r.flops_per_image else "")
        lines.append(f"| {r.name} | {r.images_per_second:.1f} | {mfu if r.kind == 'train' else ''} | "
                     f"{r.warmup_seconds:.0f} | {wait} | {memory} | {r.detail or flops} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value overrides for every row, e.g. data.batch_size_per_device=128")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="smoke run: 32 px, a tiny model, 4 rows, 2 steps")
    p.add_argument("--full", action="store_true", help="add the 24-row precision/compile/channels_last/GAN grid")
    p.add_argument("--rows", default="", help="run only the rows whose name matches this regex")
    p.add_argument("--budget-s", type=float, default=290.0, help="start no row after this many seconds (290)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per training row (30)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per row, compilation included (10)")
    p.add_argument("--data-workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)),
                   help="workers of the data rows (default: 12, or the cores less 2)")
    p.add_argument("--data-seconds", type=float, default=8.0, help="timed seconds per data row")
    p.add_argument("--images", type=int, default=1024, help="generated images to shard (1024)")
    p.add_argument("--work", default="runs/bench-gpu", help="folder for the generated images and shards")
    p.add_argument("--shards", help="use these shards instead of generating them")
    p.add_argument("--out", help="write every row as JSON here (default: <work>/bench_gpu.json)")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: make bench-gpu needs a CUDA GPU and torch sees none here; run it on a GPU node "
              "(or `python benchmarks/bench_gpu.py --device cpu --quick` for a smoke run).", file=sys.stderr)
        return 2
    overrides, size, rows = list(args.overrides), 128, default_rows(args.full)
    if args.quick:
        size, rows = 32, [Row(**{k: v for k, v in asdict(r).items()}) for r in QUICK_ROWS]
        args.steps, args.warmup, args.images = min(args.steps, 2), min(args.warmup, 1), min(args.images, 48)
        args.data_seconds, args.data_workers = min(args.data_seconds, 1.0), min(args.data_workers, 1)
        overrides = [*QUICK, *overrides]
    rows = [r for r in rows if re.search(args.rows, r.name)]
    work = Path(args.work)
    t0 = time.perf_counter()
    shards = Path(args.shards) if args.shards else build_shards(work, size, args.images)
    print(f"shards: {shards} ({time.perf_counter() - t0:.0f} s)", flush=True)

    for row in rows:
        elapsed = time.perf_counter() - t0
        if elapsed > args.budget_s:
            row.error = f"skipped: past the {args.budget_s:.0f} s budget (--budget-s, --rows)"
            continue
        started = time.perf_counter()
        try:
            if row.kind == "train":
                run_train(row, shards, overrides, args.device, args.steps, args.warmup)
            elif row.kind == "compare":
                run_compare(row, shards, overrides, args.device, args.steps, args.warmup)
            else:
                run_data(row, shards, overrides, args.device, args.data_workers, args.data_seconds)
        except Exception as e:  # noqa: BLE001 - a row that fails (e.g. out of memory) is reported, not fatal
            row.error = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        gc.collect()  # the row's trainer is gone with its function's frame: free it before the next row
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(f"  {row.name:45s} {row.images_per_second:9.1f} images/s ({time.perf_counter() - started:.0f} s, "
              f"warm-up {row.warmup_seconds:.0f} s) {row.error or row.detail}", flush=True)
    name = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if args.device == "cuda"
            else f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
    note = (f"{size} px, batch {_config(rows[0], shards, overrides).data.batch_size_per_device if rows else '-'} per GPU, "
            f"{args.steps} timed steps after {args.warmup}; {' '.join(overrides)}; "
            f"total {time.perf_counter() - t0:.0f} s")
    print()
    print(table(rows, name, note))
    out = Path(args.out) if args.out else work / "bench_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "note": note, "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"\nrows as JSON: {out}")
    return 1 if any(r.error.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
