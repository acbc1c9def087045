"""Offline demo arrays: 1-D signals (sums of chirps and noise) and 3-D volumes (random ellipsoids).

    python -m pipeline.demo_arrays signals data/signals1d [--count 1200] [--length 256]   # (make demo-signals)
    python -m pipeline.demo_arrays volumes data/volumes3d [--count 600] [--side 16]       # (make demo-volumes)

Signals: one folder per class, float32 .npy arrays [1, L] (a few as 16-bit PCM .wav files, so the demo
exercises both readers). Class k is a sum of k + 1 linear chirps, each with a random start frequency,
sweep, amplitude and phase, under a Gaussian envelope at a random position, plus white noise of a
random level (the reconstruction cannot predict it: the floor every model has).
Volumes: flat folder (no labels) of float32 .npy arrays [D, H, W] = [S, S, S]: 1-3 solid ellipsoids with
random centres, radii, orientations and intensities on a dark background, lightly blurred.
Sample i depends only on (seed, i): the same set on every machine.
"""

from __future__ import annotations

import argparse
import io
import wave
from pathlib import Path

import numpy as np

SIGNAL_CLASSES = ("one_chirp", "two_chirps", "three_chirps")
WAV_EVERY = 10  # every 10th signal is written as a 16-bit PCM .wav instead of .npy


def chirp_signal(index: int, length: int = 256, seed: int = 0) -> tuple[str, np.ndarray]:
    """-> (class name, float32 [length] in about [-1, 1])."""
    rng = np.random.default_rng([seed, index, 1])
    k = index % len(SIGNAL_CLASSES)
    t = np.linspace(0.0, 1.0, length, endpoint=False)
    x = np.zeros(length)
    for _ in range(k + 1):
        f0, sweep = rng.uniform(2, 12), rng.uniform(-8, 16)  # cycles per signal; linear sweep
        centre, width = rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.5)
        envelope = np.exp(-0.5 * ((t - centre) / width) ** 2)
        x += rng.uniform(0.3, 0.7) * envelope * np.sin(2 * np.pi * (f0 * t + 0.5 * sweep * t ** 2) + rng.uniform(0, 6.3))
    x += rng.normal(0, rng.uniform(0.01, 0.05), length)
    return SIGNAL_CLASSES[k], (x / max(1.0, np.abs(x).max())).astype(np.float32)


def ellipsoid_volume(index: int, side: int = 16, seed: int = 0) -> np.ndarray:
    """-> float32 [side, side, side] in [0, 1]."""
    rng = np.random.default_rng([seed, index, 3])
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, side)] * 3, indexing="ij"), -1)  # [S, S, S, 3]
    vol = np.zeros((side, side, side))
    for _ in range(rng.integers(1, 4)):
        centre = rng.uniform(-0.45, 0.45, 3)
        radii = rng.uniform(0.2, 0.55, 3)
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # a random rotation
        local = (grid - centre) @ q
        inside = ((local / radii) ** 2).sum(-1) <= 1.0
        vol = np.maximum(vol, inside * rng.uniform(0.4, 1.0))
    # a light 3-tap blur along each axis: soft edges, as a scanner's point spread would give
    for axis in range(3):
        vol = 0.25 * np.roll(vol, 1, axis) + 0.5 * vol + 0.25 * np.roll(vol, -1, axis)
    return vol.astype(np.float32)


def _wav_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def generate_signals(out_dir: str | Path, count: int = 1200, length: int = 256, seed: int = 0) -> Path:
    out = Path(out_dir)
    for c in SIGNAL_CLASSES:
        (out / c).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name, x = chirp_signal(i, length, seed)
        if i % WAV_EVERY == WAV_EVERY - 1:
            (out / name / f"{i:06d}.wav").write_bytes(_wav_bytes(x))
        else:
            np.save(out / name / f"{i:06d}.npy", x[None], allow_pickle=False)
    return out


def generate_volumes(out_dir: str | Path, count: int = 600, side: int = 16, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        np.save(out / f"{i:06d}.npy", ellipsoid_volume(i, side, seed), allow_pickle=False)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo_arrays", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("signals", help="1-D chirp signals, 3 classes (.npy and a few .wav)")
    s.add_argument("out_dir")
    s.add_argument("--count", type=int, default=1200)
    s.add_argument("--length", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    v = sub.add_parser("volumes", help="3-D volumes of random ellipsoids (.npy)")
    v.add_argument("out_dir")
    v.add_argument("--count", type=int, default=600)
    v.add_argument("--side", type=int, default=16)
    v.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.kind == "signals":
        out = generate_signals(args.out_dir, args.count, args.length, args.seed)
    else:
        out = generate_volumes(args.out_dir, args.count, args.side, args.seed)
    print(f"{out}: {args.count} {args.kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
