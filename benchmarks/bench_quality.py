"""Time to quality: the same recipe with and without a training term, same shards, same wall time.

    make bench-quality                                  # demo shards, 120 s of training per arm: plain vs adversarial
    make bench-quality ARGS="--arms latent"             # plain vs +VF vs +equivariance vs +latent noise
    make bench-quality ARGS="--arms latent --reverse"   # the same in reverse order (alternate passes on a busy machine)
    make bench-quality ARGS="--arms latent --steps 800" # equal steps instead of equal wall time (cost: the images/s)
    make bench-quality ARGS="--budget-seconds 600 --lpips-weights alexnet.pth --inception-weights incep.pth"

Every arm trains through the real trainer (pipeline/train.py) and is scored by the real evaluator
(python -m pipeline.evaluate: PSNR, SSIM, the weight-free sharpness ratio, the latent diagnostics
latent/probe_accuracy and latent/hf_energy_ratio, and LPIPS / rFID when their weights files are given).
Equal wall time, not equal steps: a term costs time (the adversarial stage a discriminator forward and
backward and the adaptive weight's two extra gradients; each latent term one more decoder pass or a backbone
forward), so each arm's `train.max_steps` is its measured steps per second times the budget. The rate is
measured by a short calibration run of the same arm just before (so a noisy machine affects both alike); the
table shows the wall time each run really took. The lr schedule, the KL warm-up, `disc_start` (a fraction) and
the latent noise's warm-up all scale with max_steps, so each arm is a complete, well-formed run of its length.

--arms adversarial (the default): `recipes/demo.yaml` plus the switches below (those of
recipes/flowers_gan.yaml, with the discriminator starting at 30 % of the run and trained alone for 10 % before
its loss reaches the generator).

--arms latent: `recipes/demo.yaml` (dcgan, a spatial 4 x 16 x 16 latent) plus one of the regularisers of
recipes/ldm_f8_diffusable.yaml at that recipe's weights (README: Latents for diffusion). The VF arm aligns to
`--vf-backbone` (resnet10t: its stride-4 features are the latent's 16 x 16 grid at 64 px) with `--vf-weights`;
the default `none` is a random-init backbone, since nothing is downloaded here: that row measures the term's
cost and mechanism, not the benefit of aligning to a real foundation model (give a local weights file for that).
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


def latent_arms(vf_backbone: str = "resnet10t", vf_weights: str = "none", vf_layer: int = 1,
                vf_input_size: int = 64) -> dict:
    """plain / vf / equivariance / latent_noise: each the demo recipe plus one regulariser (module doc)."""
    vf = ["loss.vf.weight=0.1", f"loss.vf.backbone={vf_backbone}", f"loss.vf.weights={vf_weights}",
          f"loss.vf.layers=[{vf_layer}]", f"loss.vf.input_size={vf_input_size}"]
    eq = ["loss.equivariance.weight=1.0", "loss.equivariance.probability=0.5",
          "loss.equivariance.scales=[0.5,0.75]", "loss.equivariance.rotations_degrees=[90,180,270]"]
    noise = ["loss.latent_noise.weight=0.5", "loss.latent_noise.sigma_max=0.5"]
    return {"plain": lambda steps: [],
            "vf": lambda steps: vf,
            "equivariance": lambda steps: eq,
            # the decoder first learns clean latents: the noise ramps up over the first 5 % of the run
            "latent_noise": lambda steps: [*noise, f"loss.latent_noise.warmup_steps={max(1, steps // 20)}"]}


def adversarial_arms() -> dict:
    return {"plain": lambda steps: [],
            "adversarial": lambda steps: [*ADVERSARIAL, f"loss.adversarial.disc_warmup_steps={steps // 10}"]}


VARIANTS = adversarial_arms()


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


def arms(args: argparse.Namespace) -> dict:
    """name -> (steps -> the switches on top of the recipe), for --arms."""
    if args.arms == "adversarial":
        return adversarial_arms()
    return latent_arms(args.vf_backbone, args.vf_weights, args.vf_layer, args.vf_input_size)


def result_row(name: str, steps: int, summary: dict, m: dict) -> dict:
    """One table row from a run's summary.json and its evaluate() metrics."""
    return {"variant": name, "steps": steps, "wall_s": summary["wall_seconds"], "psnr": m["psnr"],
            "ssim": m["ssim"], "sharpness_ratio": m["sharpness_ratio"], "lpips": m.get("lpips"),
            "rfid": m.get("rfid"), "probe_accuracy": m.get("latent/probe_accuracy"),
            "probe_chance": m.get("latent/probe_chance"), "hf_energy_ratio": m.get("latent/hf_energy_ratio")}


def format_table(rows: list[dict], which: str) -> str:
    """The markdown table: the latent diagnostics' columns for --arms latent."""
    def fmt(v, spec):
        return "skipped" if v is None else format(v, spec)

    if which == "latent":
        lines = ["| arm | steps | train wall s | images/s | PSNR dB | SSIM | sharpness ratio | probe accuracy (chance) | "
                 "latent HF energy ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['variant']} | {r['steps']} | {r['wall_s']:.0f} | {fmt(r.get('images_per_second'), '.0f')} | "
                         f"{r['psnr']:.2f} | {r['ssim']:.4f} | "
                         f"{r['sharpness_ratio']:.3f} | {fmt(r['probe_accuracy'], '.3f')} "
                         f"({fmt(r['probe_chance'], '.3f')}) | {fmt(r['hf_energy_ratio'], '.4f')} |")
        return "\n".join(lines)
    lines = ["| variant | steps | train wall s | PSNR dB | SSIM | sharpness ratio | LPIPS | rFID |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['steps']} | {r['wall_s']:.0f} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{r['sharpness_ratio']:.3f} | {fmt(r['lpips'], '.4f')} | {fmt(r['rfid'], '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", choices=("adversarial", "latent"), default="adversarial",
                   help="adversarial: plain vs the adversarial stage; latent: plain vs +VF, +equivariance, "
                        "+latent noise")
    p.add_argument("--budget-seconds", type=float, default=120.0, help="training wall time per arm")
    p.add_argument("--calibration-steps", type=int, default=30)
    p.add_argument("--recipe", default="recipes/demo.yaml")
    p.add_argument("--shards", default="bench/quality/shards/demo", help="64 px shards; generated when missing")
    p.add_argument("--count", type=int, default=2000, help="images to generate when the shards are missing")
    p.add_argument("--out", default="bench/quality/runs")
    p.add_argument("--lpips-weights", help="torchvision AlexNet ImageNet weights file (LPIPS' backbone)")
    p.add_argument("--inception-weights", help="torch-fidelity's InceptionV3 weights file (rFID)")
    p.add_argument("--steps", type=int, default=None,
                   help="equal steps instead of equal wall time: every arm trains this many steps, no calibration "
                        "(on a machine whose load changes during the benchmark, the rates are not comparable)")
    p.add_argument("--reverse", action="store_true",
                   help="run the arms in reverse order: a second pass with it alternates the order, so load that "
                        "drifts during the benchmark falls on every arm alike")
    p.add_argument("--vf-backbone", default="resnet10t", help="--arms latent: the VF arm's timm backbone")
    p.add_argument("--vf-weights", default="none",
                   help="--arms latent: its weights (none = random init; a local .pth/.safetensors file)")
    p.add_argument("--vf-layer", type=int, default=1, help="--arms latent: the timm out_index aligned to")
    p.add_argument("--vf-input-size", type=int, default=64, help="--arms latent: px the backbone sees")
    args = p.parse_args(argv)

    shards = ensure_shards(ROOT / args.shards if not Path(args.shards).is_absolute() else Path(args.shards),
                           args.count)
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    budget = f"{args.steps} steps" if args.steps else f"{args.budget_seconds:g} s of training"
    print(f"shards {shards}; arms {args.arms}; {budget} per arm; {ENV_NOTE}", flush=True)
    rows = []
    order = list(arms(args).items())
    for name, switches in (order[::-1] if args.reverse else order):
        if args.steps is None:
            calib = train(args.recipe, shards, out / f"{name}-calibration", args.calibration_steps,
                          switches(args.calibration_steps))
            steps_per_s = training_rate(out / f"{name}-calibration") / (calib["images_seen"] / calib["step"])
            steps = max(args.calibration_steps, int(args.budget_seconds * steps_per_s))
            print(f"{name}: {steps_per_s:.2f} steps/s in calibration -> train.max_steps={steps}", flush=True)
        else:
            steps = args.steps
        summary = train(args.recipe, shards, out / name, steps, switches(steps))
        rows.append(result_row(name, steps, summary, evaluate(out / name, args.lpips_weights, args.inception_weights)))
        rows[-1]["images_per_second"] = training_rate(out / name)

    rows = [r for name, _ in order for r in rows if r["variant"] == name]  # the table in the arms' order
    print("\n" + format_table(rows, args.arms))
    if args.arms == "adversarial":
        plain, gan = rows
        closer = abs(1 - gan["sharpness_ratio"]) < abs(1 - plain["sharpness_ratio"])
        print(f"\nsharpness ratio |1 - r|: plain {abs(1 - plain['sharpness_ratio']):.3f}, adversarial "
              f"{abs(1 - gan['sharpness_ratio']):.3f} -> the adversarial stage is "
              f"{'closer to' if closer else 'NOT closer to'} the inputs' fine detail at equal wall time")
    if args.arms == "latent" and args.vf_weights == "none":
        print(f"\nvf aligns to a random-init {args.vf_backbone}: its row shows the term's cost and mechanism, not "
              f"the benefit of a real foundation model's features")
    (out / f"quality-{args.arms}.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
