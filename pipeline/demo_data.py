"""Offline demo images: procedurally drawn flowers, one folder per class, as photo-sized JPEGs.

    python -m pipeline.demo_data data/demo [--count 2000] [--size 500] [--seed 0]   # (make demo-data)

The class is the petal count and shape (trillium: 3 broad, clover: 4 round, starflower: 5 pointed,
lily: 6 long pointed, daisy: 14 thin); colour, size, position, rotation, background and image size
(long side between 0.64 x SIZE and SIZE, 4:3 landscape or portrait, or square: 320x240 to 500x375
by default) vary. Image i depends only on (seed, i), so the set is the same on every machine and
with any worker count. The folder doubles as the data benchmark's source corpus.

A finished set leaves .demo_data.json (its parameters) in OUT_DIR, written last; a re-run with the
same parameters returns at once, a re-run with other ones replaces the class folders.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline import durable

VERSION = 1  # bump when the drawing changes, so old folders are regenerated
MARKER = ".demo_data.json"
# name -> (petal count, petal shape, petal length / width ratio)
CLASSES: dict[str, tuple[int, str, float]] = {
    "trillium": (3, "round", 1.3),
    "clover": (4, "round", 1.0),
    "starflower": (5, "pointed", 2.2),
    "lily": (6, "pointed", 3.2),
    "daisy": (14, "round", 4.5),
}
JPEG_QUALITY = 90


def _petal(shape: str, length: float, width: float, n: int = 20) -> np.ndarray:
    """Outline of a petal pointing along +x from the origin: [2n, 2] points."""
    t = np.linspace(0.0, 1.0, n)
    if shape == "round":  # an ellipse touching the centre
        x = length * t
        y = width / 2 * np.sqrt(np.clip(1 - (2 * t - 1) ** 2, 0, 1))
    else:  # widest at 40 %, a sharp tip
        x = length * t
        y = width / 2 * np.sin(np.pi * t**0.75) ** 0.9
    return np.concatenate([np.stack([x, y], 1), np.stack([x[::-1], -y[::-1]], 1)])


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    long = int(rng.integers(round(0.64 * size), size + 1))
    short = round(long * 3 / 4)
    kind = rng.random()
    if kind < 0.7:
        return long, short
    if kind < 0.9:
        return short, long
    return short, short


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A soft vertical gradient (sky/foliage) with low-frequency blotches and a little sensor noise."""
    top = np.array(_hsv_to_rgb(rng.uniform(0.25, 0.65), rng.uniform(0.2, 0.6), rng.uniform(0.5, 0.95)), float)
    bottom = np.array(_hsv_to_rgb(rng.uniform(0.2, 0.4), rng.uniform(0.4, 0.9), rng.uniform(0.2, 0.6)), float)
    # Built at 1/8 resolution (it is smooth) and upsampled in C: full-size float maths was the cost.
    sw, sh = max(2, w // 8), max(2, h // 8)
    ramp = np.linspace(0, 1, sh)[:, None, None]
    small = top * (1 - ramp) + bottom * ramp
    blotch = rng.normal(0, 25, (5, 7, 3)).astype(np.float32)
    blotch = np.stack([np.asarray(Image.fromarray(blotch[..., c], "F").resize((sw, sh), Image.Resampling.BICUBIC))
                       for c in range(3)], -1)
    small = Image.fromarray(np.clip(small + blotch, 0, 255).astype(np.uint8), "RGB")
    img = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
    img = img + rng.integers(-4, 5, (h, w, 1), dtype=np.int16)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def draw_flower(index: int, seed: int = 0, size: int = 500) -> tuple[str, Image.Image]:
    """-> (class name, RGB image) for image `index`; a pure function of (index, seed, size)."""
    names = list(CLASSES)
    name = names[index % len(names)]
    n_petals, shape, ratio = CLASSES[name]
    rng = np.random.default_rng([seed, index])
    w, h = _image_size(rng, size)
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)

    radius = rng.uniform(0.18, 0.36) * min(w, h)
    cx = rng.uniform(radius, w - radius)
    cy = rng.uniform(radius, h - radius)
    # Stem and two leaves below the head.
    green = _hsv_to_rgb(rng.uniform(0.22, 0.38), rng.uniform(0.5, 0.9), rng.uniform(0.25, 0.55))
    draw.line([(cx, cy), (cx + rng.uniform(-0.2, 0.2) * w, h)], fill=green, width=max(2, int(radius * 0.08)))
    for side in (-1, 1):
        ly = cy + rng.uniform(0.4, 0.9) * (h - cy)
        leaf = _petal("pointed", radius * rng.uniform(0.5, 0.8), radius * 0.25) * [side, 1]
        a = rng.uniform(-0.6, 0.2)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        draw.polygon([tuple(p) for p in leaf @ rot.T + [cx, ly]], fill=green)

    hue = rng.random()
    base = np.array(_hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.7, 1.0)), float)
    length = radius
    width = length / ratio * (2.2 if n_petals <= 4 else 1.6)
    outline = _petal(shape, length, width)
    angle0 = rng.uniform(0, 2 * np.pi)
    for i in range(n_petals):
        a = angle0 + 2 * np.pi * i / n_petals + rng.normal(0, 0.04)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        pts = outline * rng.uniform(0.9, 1.05) @ rot.T + [cx, cy]
        shade = np.clip(base * rng.uniform(0.85, 1.1), 0, 255).astype(int)
        draw.polygon([tuple(p) for p in pts], fill=tuple(shade), outline=tuple((shade * 0.7).astype(int)))
    disc = radius * rng.uniform(0.15, 0.28)
    centre = _hsv_to_rgb(rng.uniform(0.08, 0.16), rng.uniform(0.6, 1.0), rng.uniform(0.4, 0.95))
    draw.ellipse([cx - disc, cy - disc, cx + disc, cy + disc], fill=centre)
    # No blur: a filter pass costs as much as the whole drawing, and the sharder's antialiased
    # downscale removes the polygon edges' aliasing anyway.
    return name, img


def _write_one(job: tuple[int, int, int, str]) -> None:
    index, seed, size, out = job
    name, img = draw_flower(index, seed, size)
    img.save(os.path.join(out, name, f"{name}_{index:05d}.jpg"), "JPEG", quality=JPEG_QUALITY)


def generate(out_dir: str | Path, count: int = 2000, size: int = 500, seed: int = 0,
             workers: int | None = None, log=print) -> bool:
    """Write the demo set into out_dir. -> False when an identical complete set was already there."""
    out = Path(out_dir)
    params = {"version": VERSION, "count": count, "size": size, "seed": seed, "classes": list(CLASSES)}
    marker = out / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                log(f"{out}: demo set already complete ({count} images, seed {seed}); nothing to do")
                return False
        except ValueError:
            pass
        marker.unlink()
    for name in CLASSES:  # a set with other parameters (or a half-written one) is replaced whole
        shutil.rmtree(out / name, ignore_errors=True)
        (out / name).mkdir(parents=True)
    t0 = time.perf_counter()
    jobs = [(i, seed, size, str(out)) for i in range(count)]
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers <= 1 or count < 100:
        for job in jobs:
            _write_one(job)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=16):
                pass
    durable.write_text(marker, json.dumps(params) + "\n")  # last: its presence means the set is complete
    log(f"{out}: wrote {count} demo images in {len(CLASSES)} classes in {time.perf_counter() - t0:.1f} s")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo_data",
                                description="Generate offline, deterministic demo flowers (one folder per class).")
    p.add_argument("out_dir", help="output folder, e.g. data/demo")
    p.add_argument("--count", type=int, default=2000, help="number of images (2000)")
    p.add_argument("--size", type=int, default=500, help="largest long side in px; sizes vary from 0.64x to 1x (500)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    args = p.parse_args(argv)
    if args.count < 1 or args.size < 32:
        print("error: --count must be at least 1 and --size at least 32", file=sys.stderr)
        return 2
    generate(args.out_dir, args.count, args.size, args.seed, args.workers or None)
    return 0


if __name__ == "__main__":
    from pipeline.demo_data import main as _main  # so spawned workers unpickle pipeline.demo_data._write_one

    sys.exit(_main())
