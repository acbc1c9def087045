"""Is a 1-D / 3-D run clearly better than trivial? Its evaluation beside the trivial reconstruction.

    python benchmarks/bench_multidim.py runs/signals1d      # after `make demo-signals` and training the recipe
    python benchmarks/bench_multidim.py runs/volumes3d

Scores the run with the real evaluator (python -m pipeline.evaluate: PSNR and SSIM of decode(mu) on the
val split, data in [0, 1] after the shards' normalisation) and, on the same val samples and the same
metric functions, the trivial reconstruction that ignores its input: the mean training sample (what a
model with a collapsed posterior would output at best, in mean squared error). Prints both and the
PSNR gain in dB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import data_range, read_manifest, val_batches  # noqa: E402
from pipeline.evaluate import psnr_per_image, ssim_per_image  # noqa: E402


def unit(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return ((x.float() - low) / (high - low)).clamp(0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    args = p.parse_args()
    run = Path(args.run_dir)
    cfg = load_config(run / "config.yaml", ["data.num_workers=0"])
    low, high = data_range(read_manifest(cfg.data.shards))
    total, n = None, 0
    for batch in val_batches(cfg, 0, 1, split="train"):
        x = unit(batch.images, low, high)
        total = x.sum(0) if total is None else total + x.sum(0)
        n += len(x)
    mean = total / n
    psnr, ssim, count = 0.0, 0.0, 0
    for batch in val_batches(cfg, 0, 1, split="val"):
        x = unit(batch.images, low, high)
        guess = mean.expand_as(x).contiguous()
        psnr += float(psnr_per_image(guess, x).sum())
        ssim += float(ssim_per_image(guess, x).sum())
        count += len(x)
    out = run / "eval" / "bench_multidim.json"
    subprocess.run([sys.executable, "-m", "pipeline.evaluate", str(run), "--iwae-k", "4", "tracking.mode=disabled",
                    "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    m = json.loads(out.read_text())
    print(f"{run}: {count} val samples\n"
          f"  trained model  psnr {m['psnr']:.2f} dB   ssim {m['ssim']:.4f}\n"
          f"  mean sample    psnr {psnr / count:.2f} dB   ssim {ssim / count:.4f}\n"
          f"  gain           {m['psnr'] - psnr / count:+.2f} dB")


if __name__ == "__main__":
    main()
