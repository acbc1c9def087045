"""Time to quality: the same recipe with and without the adversarial stage, same shards, same wall time.

    make bench-quality                                  # demo shards, 120 s of training per variant
    make bench-quality ARGS="--budget-seconds 600 --lpips-weights alexnet.pth --inception-weights incep.pth"

Both variants train through the real trainer (pipeline/train.py) and are scored by the real evaluator
(python -m pipeline.evaluate: PSNR, SSIM, the weight-free sharpness ratio, and LPIPS / rFID when their
weights files are given). Equal wall time, not equal steps: the adversarial step costs more (a
discriminator forward and backward, and the adaptive weight's two extra gradients), so each variant's
`train.max_steps` is its measured steps per second times the budget. The rate is measured by a short
calibration run of the same variant just before (so a noisy machine affects both alike); the table shows
the wall time each run really took. The lr schedule, the KL warm-up and `disc_start` (a fraction) all
scale with max_steps, so each variant is a complete, well-formed run of its length.

The adversarial variant is `recipes/demo.yaml` plus the switches below (those of recipes/flowers_gan.yaml,
with the discriminator starting at 30 % of the run and trained alone for 10 % before its loss reaches the
generator).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_NOTE = "WANDB_MODE=disabled for every run (tracking.mode=disabled)"

ADVERSARIAL = ["loss.adversarial.weight=0.5", "loss.adversarial.loss=hinge", "loss.adversarial.disc_layers=2",
               "loss.adversarial.disc_channels=32", "loss.adversarial.disc_start=0.3",
               "loss.adversarial.lecam_weight=0.001", "loss.adversarial.lr=0.0002"]
VARIANTS = {"plain": lambda steps: [],
            "adversarial": lambda steps: [*ADVERSARIAL, f"loss.adversarial.disc_warmup_steps={steps // 10}"]}


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: {what} failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")


def ensure_shards(shards: Path, count: int) -> Path:
    """The demo shards at 64 px, generated offline when missing (as `make demo-data` does)."""
    if (shards / "manifest.json").exists():
        return shards
    images = shards.parent.parent / "images"
    _run([sys.executable, "-m", "pipeline.demo_data", str(images), "--count", str(count)], "generating images")
    _run([sys.executable, "-m", "pipeline.shards", str(images), "--name", shards.name, "--size", "64",
          "--out", str(shards.parent)], "sharding")
    return shards


def train(recipe: str, shards: Path, run_dir: Path, steps: int, extra: list[str]) -> dict:
    """One fresh training run through pipeline/train.py; returns its summary.json."""
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = [sys.executable, "pipeline/train.py", recipe, f"data.shards={shards}", f"run.dir={run_dir.parent}",
            f"run.name={run_dir.name}", f"train.max_steps={steps}", "train.resume=never",
            f"train.checkpoint_every_steps={steps}", "tracking.mode=disabled",
            f"tracking.media_every_steps={steps}", f"tracking.eval_every_steps={steps}",
            f"optim.warmup_steps={max(1, steps // 40)}", f"loss.kl.warmup_steps={max(1, steps // 8)}", *extra]
    _run(argv, f"training {run_dir.name}")
    return json.loads((run_dir / "summary.json").read_text())


def training_rate(run_dir: Path) -> float:
    """Images/s of the training steps alone (train.py's interval rate, which leaves out media, validation
    and checkpoints), over the logged intervals after the first (warm-up)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["train/images_per_second"] for r in rows if "train/images_per_second" in r]
    return statistics.median(rates[1:] or rates)


def evaluate(run_dir: Path, lpips: str | None, inception: str | None) -> dict:
    out = run_dir / "eval" / "quality.json"
    argv = [sys.executable, "-m", "pipeline.evaluate", str(run_dir), "--iwae-k", "1", "--perceptual", "off",
            "--out", str(out)]
    argv += ["--lpips-weights", lpips] if lpips else []
    argv += ["--inception-weights", inception] if inception else []
    _run(argv, f"evaluating {run_dir.name}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-seconds", type=float, default=120.0, help="training wall time per variant")
    p.add_argument("--calibration-steps", type=int, default=30)
    p.add_argument("--recipe", default="recipes/demo.yaml")
    p.add_argument("--shards", default="bench/quality/shards/demo", help="64 px shards; generated when missing")
    p.add_argument("--count", type=int, default=2000, help="images to generate when the shards are missing")
    p.add_argument("--out", default="bench/quality/runs")
    p.add_argument("--lpips-weights", help="torchvision AlexNet ImageNet weights file (LPIPS' backbone)")
    p.add_argument("--inception-weights", help="torch-fidelity's InceptionV3 weights file (rFID)")
    args = p.parse_args(argv)

    shards = ensure_shards(ROOT / args.shards if not Path(args.shards).is_absolute() else Path(args.shards),
                           args.count)
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    print(f"shards {shards}; {args.budget_seconds:g} s of training per variant; {ENV_NOTE}", flush=True)
    rows = []
    for name, switches in VARIANTS.items():
        calib = train(args.recipe, shards, out / f"{name}-calibration", args.calibration_steps,
                      switches(args.calibration_steps))
        steps_per_s = training_rate(out / f"{name}-calibration") / (calib["images_seen"] / calib["step"])
        steps = max(args.calibration_steps, int(args.budget_seconds * steps_per_s))
        print(f"{name}: {steps_per_s:.2f} steps/s in calibration -> train.max_steps={steps}", flush=True)
        summary = train(args.recipe, shards, out / name, steps, switches(steps))
        m = evaluate(out / name, args.lpips_weights, args.inception_weights)
        rows.append({"variant": name, "steps": steps, "wall_s": summary["wall_seconds"], "psnr": m["psnr"],
                     "ssim": m["ssim"], "sharpness_ratio": m["sharpness_ratio"], "lpips": m.get("lpips"),
                     "rfid": m.get("rfid")})

    def fmt(v, spec):
        return "skipped" if v is None else format(v, spec)

    print("\n| variant | steps | train wall s | PSNR dB | SSIM | sharpness ratio | LPIPS | rFID |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['steps']} | {r['wall_s']:.0f} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
              f"{r['sharpness_ratio']:.3f} | {fmt(r['lpips'], '.4f')} | {fmt(r['rfid'], '.2f')} |")
    plain, gan = rows
    closer = abs(1 - gan["sharpness_ratio"]) < abs(1 - plain["sharpness_ratio"])
    print(f"\nsharpness ratio |1 - r|: plain {abs(1 - plain['sharpness_ratio']):.3f}, adversarial "
          f"{abs(1 - gan['sharpness_ratio']):.3f} -> the adversarial stage is "
          f"{'closer to' if closer else 'NOT closer to'} the inputs' fine detail at equal wall time")
    (out / "quality.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
