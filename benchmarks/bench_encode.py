"""Throughput of `encode --format shards` (pipeline/encode.py) against a plain loop over the same shards
(`make bench-encode`).

Both sides read the same shards, decode the same JPEGs, run the same model's encoder on batches of the
same size and write each sample's mu as an .npy member of a tar. The plain loop is what an ad-hoc script
does: tarfile over each shard in the main process, decode, stack, encode, write. The pipeline side is
the real command (one process here): DataLoader workers reading units ahead of the model (prefetch,
pinned memory on GPU), channels_last, bf16 autocast on GPU, tar + sidecar + sha256 per unit, the
manifest. Rounds alternate between the two so machine noise hits both alike; medians and their ratio
are printed, with the pipeline's data-wait fraction.

    python benchmarks/bench_encode.py [--count 1000 --size 64 --rounds 3 --workers 2 --batch-size 64]

The model is the demo recipe's (conv, 64 px) trained for one step in a work folder: its speed, not its
quality, matters here. GPU: pass --recipe and key=value overrides for the model you care about.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from pipeline import sample
from pipeline.images import decode_image
from pipeline.inference import load_run


def prepare(work: Path, count: int, size: int, recipe: str, overrides: list[str]) -> tuple[Path, Path]:
    """Shards of `count` generated images at `size` px, and a run folder of one training step."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    shards = work / "shards" / "bench"
    if not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline.demo_data", str(work / "images"), "--count", str(count)],
                       check=True, cwd=ROOT, env=env, capture_output=True)
        subprocess.run([sys.executable, "-m", "pipeline.shards", str(work / "images"), "--name", "bench", "--size",
                        str(size), "--out", str(work / "shards"), "--max-samples-per-shard", "250"],
                       check=True, cwd=ROOT, env=env, capture_output=True)
    run_dir = work / "runs" / "bench"
    if not (run_dir / "checkpoints" / "latest").exists():
        r = subprocess.run([sys.executable, "pipeline/train.py", recipe, f"data.shards={shards}",
                            f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", "train.max_steps=1",
                            "train.checkpoint_every_steps=1", "tracking.mode=disabled", "data.num_workers=0",
                            "tracking.eval_every_steps=1000", "tracking.media_every_steps=1000", *overrides],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"training the benchmark model failed:\n{r.stderr[-2000:]}")
    return shards, run_dir


def pipeline_round(run_dir: Path, shards: Path, out: Path, workers: int, batch_size: int) -> tuple[float, float]:
    """(images/s, data-wait fraction) as the encoder reports them for its loop."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        sample.main([str(run_dir), "encode", str(shards), "--format", "shards", "--out", str(out), "--force",
                     "--num-workers", str(workers), "--batch-size", str(batch_size)])
    m = re.search(r"encoded (\d+) images in \d+ units, ([\d.]+) images/s, data wait ([\d.]+) %", buf.getvalue())
    return float(m.group(2)), float(m.group(3)) / 100


@torch.no_grad()
def plain_round(run, shards: Path, out: Path, batch_size: int) -> float:
    """images/s of the plain loop (timed like the encoder's: the loop only)."""
    files = sorted(shards.glob("*-[0-9]*.tar"))
    t0, n = time.perf_counter(), 0
    with tarfile.open(out, "w") as sink:
        def flush(keys, images):
            x = run.to_model_range(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
            mu, _ = run.model.encode(x)
            for key, m in zip(keys, mu.float().cpu().numpy()):
                b = io.BytesIO()
                np.save(b, m, allow_pickle=False)
                info = tarfile.TarInfo(f"{key}.mu.npy")
                info.size = b.tell()
                b.seek(0)
                sink.addfile(info, b)

        for f in files:
            keys, images = [], []
            with tarfile.open(f) as t:
                for member in t:
                    key, _, ext = member.name.partition(".")
                    if ext != "jpg":
                        continue
                    keys.append(key)
                    images.append(decode_image(t.extractfile(member).read(), ext))
                    if len(keys) == batch_size:
                        flush(keys, images)
                        n += len(keys)
                        keys, images = [], []
            if keys:
                flush(keys, images)
                n += len(keys)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1000, help="generated source images")
    p.add_argument("--size", type=int, default=64, help="stored image side in px (the demo recipe's)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    p.add_argument("--workers", type=int, default=2, help="the encoder's data workers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--recipe", default="recipes/demo.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the benchmark model's recipe")
    p.add_argument("--work", default="bench/encode", help="work folder (git-ignored)")
    args = p.parse_args()
    work = (ROOT / args.work).resolve()
    shards, run_dir = prepare(work, args.count, args.size, args.recipe, args.overrides)
    run = load_run(run_dir)
    ours, waits, plain = [], [], []
    for r in range(args.rounds):
        rate, wait = pipeline_round(run_dir, shards, work / "latents", args.workers, args.batch_size)
        ours.append(rate)
        waits.append(wait)
        plain.append(plain_round(run, shards, work / "plain.tar", args.batch_size))
        print(f"round {r + 1}: encode {ours[-1]:.0f} images/s (data wait {100 * wait:.0f} %), "
              f"plain loop {plain[-1]:.0f} images/s", flush=True)
    a, b = statistics.median(ours), statistics.median(plain)
    device = "cuda" if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.count} images at {args.size} px, {args.recipe} model, batch {args.batch_size}, {device}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"encode --format shards ({args.workers} workers): {a:.0f} images/s, data wait "
          f"{100 * statistics.median(waits):.0f} %")
    print(f"plain loop (tarfile, decode, encode, write, one process): {b:.0f} images/s")
    print(f"ratio encode / plain loop: {a / b:.2f}x")


if __name__ == "__main__":
    main()
