"""What you can do with a trained VAE: sample, reconstruct, interpolate, traverse, encode, decode, score anomalies.

    python -m pipeline.sample RUN_DIR prior [--n 64] [--temperature 1.0] [--separate] [--prior expost|normal]
                                            [--score CLASSIFIER.safetensors]
    python -m pipeline.sample RUN_DIR reconstruct IMAGE_OR_FOLDER [...]
    python -m pipeline.sample RUN_DIR interpolate IMAGE_A IMAGE_B [--steps 10]
    python -m pipeline.sample RUN_DIR traverse [--dims 4] [--images IMAGE_OR_FOLDER ...]
    python -m pipeline.sample RUN_DIR encode SHARDS_OR_FOLDER [--split val|train|all] [--format npy|shards]
    python -m pipeline.sample RUN_DIR decode LATENTS [...] [--format png|npy]
    python -m pipeline.sample RUN_DIR anomaly IMAGES_OR_SHARDS [...] [--top-k 16] [--samples 16]

Options every mode takes: --out PATH, --force (replace an existing output; without it nothing is ever
overwritten), --checkpoint step-000500 (default: the latest), --weights ema|raw, --seed N, --device cpu|cuda,
--batch-size N, --image-size N (only when the run's shards are gone). Outputs default to RUN_DIR/samples/.

- prior: a grid of decode(z) (PNG; --separate also writes one PNG per sample), z from the run's ex-post prior
  (pipeline.prior: a Gaussian mixture fitted to the posterior means of train images, its covariances scaled by
  temperature^2) when it has one for the loaded weights, else z ~ N(0, temperature^2 I); --prior picks.
  --score CLASSIFIER adds the classifier score and class histograms of N(0, I) samples, ex-post samples and
  val images (pipeline.sample_score) as OUT-score.json.
- reconstruct: each image beside decode(mu) of it (PNG), the posterior mean: no sampling noise. With
  --native-size (spatial-latent models) images keep their own size (centre-cropped to a multiple of the
  model's downsampling factor) and go through overlapping tiles of --tile-size px (default: the training
  size) blended over --tile-overlap px (pipeline.tiling); OUT is then a folder of one PNG per image.
- interpolate: decode(slerp(mu_A, mu_B, t)) for `steps` values of t in [0, 1] as a strip PNG and an
  animated GIF (forward and back, looping).
- traverse: for the `dims` latent dimensions with the highest KL (over the images), one grid per
  dimension: rows = images, columns = that dimension of mu set to -3 ... 3 (prior standard deviations).
  Images default to the first validation images of the run's shards.
- encode: mu and logvar of every sample, with its key and label: OUT/mu.npy, OUT/logvar.npy [N, *latent]
  float32 and OUT/index.csv (row, key, label, class, source), OUT/meta.json; or with --format shards
  (shards folders; under `accelerate launch` on any number of processes and nodes, resumable):
  WebDataset tars OUT/<split>-NNNNNN.tar, one per source shard, members <key>.mu.npy (--store
  mu,logvar,z), <key>.cls, <key>.json, and OUT/manifest.json with sha256s and latent statistics
  (pipeline.encode describes the format and the guarantees).
- decode: latents back to images: .npy files ([*latent] or [N, *latent]; key = file name, -NNNN for
  rows) and latent shards folders (--latent mu|z picks the member) -> OUT/<key>.png, or with
  --format npy float32 [H, W, 3] in [0, 1]. Latents larger than the model's go through tiles.
- anomaly: per image -ELBO (nats and bits/dim, the likelihood of pipeline.evaluate, K samples of z seeded
  by the image's key) and the reconstruction MSE of decode(mu) on [0, 1], as a CSV sorted worst first,
  and a PNG of the top-k images beside their reconstructions.

Images are read with pipeline.images.load_image (the `make shards` path: EXIF, RGB, resize, centre crop).
A missing checkpoint or an unreadable image is one sentence on stderr and exit code 2.

Signals and volumes (runs with model.spatial_dims 1 or 3; README: 1-D and 3-D data): prior writes
OUT.npy float32 [N, C, *spatial] in the data's own units (the manifest's normalisation undone) and a
preview PNG beside it; reconstruct takes .npy/.wav files or shards folders and writes OUT/inputs.npy,
OUT/recons.npy (data units), OUT/index.csv and OUT/preview.png (line plots / mid-slices); encode works
as for images (--format npy). The other modes are for images and say so.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline import arrays, durable, media, tiling
from pipeline import prior as prior_module
from pipeline.config import load_config
from pipeline.errors import UserError, exit_on_user_error
from pipeline.data import Batch
from pipeline.evaluate import log_weights, to_unit_range
from pipeline.models.quantize import codes_dtype
from pipeline.images import describe_error, load_rgb
from pipeline.inference import (LoadedRun, check_shards, folder_batches, image_files, is_shards_folder, key_noise,
                                load_images, load_run, split_batches)
from pipeline.objective.kl import kl_per_dim
from pipeline.objective.likelihood import LN2, fixed_log_scale
from pipeline.prior import ExpostPrior
from pipeline.sample_score import format_scores, score_prior_samples

GIF_FRAME_MS = 100


# --------------------------------------------------------------------------------------------
# Outputs: never overwritten without --force, always written whole (temporary file, then rename)
# --------------------------------------------------------------------------------------------


class Outputs:
    """The files a mode will write, checked before any work is done."""

    def __init__(self, force: bool):
        self.force = force

    def file(self, path: Path) -> Path:
        if path.exists() and not self.force:
            raise UserError(f"{path} exists; pass --force to overwrite it or choose another --out")
        if path.is_dir():
            raise UserError(f"{path} is a folder; give a file name with --out")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def folder(self, path: Path, patterns: Sequence[str]) -> Path:
        """A folder whose files matching `patterns` are ours: refused if any exist, removed with --force."""
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} exists and is not a folder; choose another --out")
        ours = sorted({f for p in patterns for f in path.glob(p)}) if path.is_dir() else []
        if ours and not self.force:
            raise UserError(f"{path} already holds output ({ours[0].name}, ...); pass --force to replace it "
                              f"or choose another --out")
        for f in ours:
            f.unlink()
        path.mkdir(parents=True, exist_ok=True)
        return path


def save_npy(array: np.ndarray, path: Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return durable.write_with(path, write)


def save_gif(frames: Sequence[np.ndarray], path: Path, frame_ms: int = GIF_FRAME_MS) -> Path:
    """uint8 [H, W, 3] frames -> a looping GIF that plays forward then back."""
    seq = list(frames) + list(frames[-2:0:-1])
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in seq]
    return durable.write_with(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True,
                                                             append_images=images[1:], duration=frame_ms, loop=0))


def save_csv(rows: list[dict], path: Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["key"])
            w.writeheader()
            w.writerows(rows)

    return durable.write_with(path, write)


def save_json(data: dict, path: Path) -> Path:
    return durable.write_json(path, data, indent=1)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _folder_keys(files: Sequence[Path], roots: Sequence[str]) -> tuple[list[str], list[str]]:
    """(keys, sources) for user files: source = the path relative to the folder it was found in (or the
    file name); key = source without the extension, dots -> '_' (WebDataset keys end at the first dot)."""
    sources = []
    for f in files:
        base = next((Path(r) for r in roots if Path(r).is_dir() and Path(r) in f.parents), None)
        sources.append(f.relative_to(base).as_posix() if base is not None else f.name)
    keys = [str(Path(s).with_suffix("")).replace(".", "_") for s in sources]
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):  # the same name in two folders given on the command line
        if k in seen:
            keys[i] = f"{k}_{i}"
        seen[k] = i
    return keys, sources


class Inputs:
    """Images from shards folders (every sample of the chosen split(s)) and/or image files and folders."""

    def __init__(self, run: LoadedRun, paths: Sequence[str], split: str, batch_size: int):
        self.run, self.batch_size = run, batch_size
        self.shards = [p for p in paths if is_shards_folder(p)]
        others = [p for p in paths if not is_shards_folder(p)]
        for s in self.shards:
            check_shards(s, run.image_size, run.cfg)
        self.splits = ("train", "val") if split == "all" else (split,)
        self.is_array = run.data_range is not None
        self.files = (array_files(others, run.cfg.model.spatial_dims) if self.is_array else image_files(others)) \
            if others else []
        self.keys, self.sources = _folder_keys(self.files, others)

    def batches(self) -> Iterator[tuple[Batch, list[str]]]:
        """(Batch, source of each sample); a shards sample's source is `<split>`."""
        for shards in self.shards:
            for split in self.splits:
                for batch in split_batches(self.run.cfg, shards, split):
                    yield batch, [f"{shards}:{split}"] * len(batch.keys)
        if self.files:
            make = array_batches if self.is_array else folder_batches
            shape = (self.run.model.in_channels, *[self.run.image_size] * self.run.model.spatial_dims)
            for i, batch in enumerate(make(self.files, self.keys, shape if self.is_array else self.run.image_size,
                                           self.batch_size)):
                yield batch, self.sources[i * self.batch_size:(i + 1) * self.batch_size]


def array_files(paths: Sequence[str], spatial_dims: int) -> list[Path]:
    """.npy (and, 1-D, .wav) files named directly or found under named folders (sorted, recursive)."""
    return image_files(paths, arrays.ARRAY_EXTENSIONS[spatial_dims], "arrays")


def array_batches(files: Sequence[Path], keys: Sequence[str], shape: tuple[int, ...],
                  batch_size: int) -> Iterator[Batch]:
    """Array files as Batches of float32 [B, C, *spatial] in the data's units (the stream's layout), each
    checked as `make shards` checks it (channels first); UserError naming the first file that does not fit."""
    for i in range(0, len(files), batch_size):
        chunk, samples = files[i:i + batch_size], []
        for f in chunk:
            try:
                arr, _ = arrays.load_array(f)
                sample = arrays.to_sample(arr, len(shape) - 1, wav=f.suffix.lower() == ".wav")
            except (ValueError, OSError) as e:
                raise UserError(f"cannot read {f}: {e}; give arrays like the training shards'") from None
            if sample.shape != shape:
                raise UserError(f"{f} is {list(sample.shape)} as [C, *spatial] but the model takes {list(shape)}")
            samples.append(torch.from_numpy(sample))
        yield Batch(torch.stack(samples), torch.full((len(chunk),), -1, dtype=torch.int64), list(keys[i:i + len(chunk)]))


def _refuse_for_arrays(run: LoadedRun, mode: str) -> None:
    if run.data_range is not None:
        raise UserError(f"pipeline.sample {mode} works on images; for signals and volumes use prior, reconstruct "
                          f"or encode")


def _class_name(run: LoadedRun, label: int) -> str:
    return run.classes[label] if 0 <= label < len(run.classes) else ""


def _side_by_side(inputs: np.ndarray, recons: np.ndarray, pairs_per_row: int = 4) -> np.ndarray:
    """uint8 [N,H,W,3] pairs -> a grid of (input | reconstruction) pairs, `pairs_per_row` pairs per row."""
    tiles = np.stack([inputs, recons], axis=1).reshape(-1, *inputs.shape[1:])
    return media.make_grid(tiles, nrow=2 * max(1, min(pairs_per_row, len(inputs))))


def _tile_options(run: LoadedRun, args) -> tuple[int, int]:
    tile = args.tile_size or run.image_size
    return tile, args.tile_overlap if args.tile_overlap is not None else tile // 4


@torch.no_grad()
def reconstruction(run: LoadedRun, x: torch.Tensor, tile_px: int | None = None, overlap_px: int = 0) -> torch.Tensor:
    """decode(mu) of images x [B,C,H,W] in the model's range; through tiles when larger than tile_px."""
    if tile_px is not None and max(x.shape[-2:]) > tile_px:
        mu, _ = tiling.tiled_encode(run.model, x, tile_px, overlap_px)
        return tiling.tiled_decode(run.model, mu, tile_px, overlap_px)
    mu, _ = run.model.encode(x)
    return run.model.decode(mu)


def _reconstruct(run: LoadedRun, images_uint8: torch.Tensor) -> np.ndarray:
    return media.to_uint8(reconstruction(run, run.to_model_range(images_uint8)), run.model.output_range)


def load_native(path: Path, multiple: int) -> torch.Tensor:
    """uint8 [1, 3, H, W]: the image at its own size (EXIF, RGB as `make shards`), centre-cropped to
    multiples of `multiple`."""
    try:
        img = load_rgb(path)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for a bad file; all are the user's file
        raise UserError(f"cannot read image {path}: {describe_error(e)}; remove it or convert it to PNG/JPEG") \
            from None
    w, h = img.size
    cw, ch = w - w % multiple, h - h % multiple
    if not cw or not ch:
        raise UserError(f"image {path} is {w}x{h} px, smaller than the model's downsampling factor {multiple}")
    left, top = (w - cw) // 2, (h - ch) // 2
    arr = np.asarray(img.crop((left, top, left + cw, top + ch)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------


def expost_prior(run: LoadedRun, choice: str | None) -> ExpostPrior | None:
    """The run's ex-post prior (RUN_DIR/expost_prior.safetensors) when `choice` is expost, or None (default)
    and the run has one fitted to the loaded weights; None for normal. An explicit expost without a
    matching file is one sentence saying how to fit it; the default falls back to N(0, I) with a note."""
    if choice == "normal":
        return None
    path = run.run_dir / prior_module.FILE_NAME
    fit = f"`python -m pipeline.prior {run.run_dir} --checkpoint {run.checkpoint.name} --weights {run.weights}`"
    problem = None
    if run.model.quantizer is not None:
        problem = "a quantized model has no Gaussian latent for an ex-post prior"
    elif not path.is_file():
        problem = f"{run.run_dir} has no ex-post prior ({path.name}; training writes it when prior.components > 0)"
    else:
        found = ExpostPrior.load(path)
        made_for = (found.meta.get("step"), found.meta.get("weights"))
        if tuple(found.latent_shape) != tuple(run.model.latent_shape):
            problem = f"{path} is for latents of shape {list(found.latent_shape)}, not {list(run.model.latent_shape)}"
        elif made_for != (run.step, run.weights):
            problem = (f"{path} was fitted to the {made_for[1]} weights of step {made_for[0]}, not the {run.weights} "
                       f"weights of {run.checkpoint.name}")
        else:
            return found
    if choice == "expost":
        raise UserError(f"{problem}; fit one with {fit}" if "quantized" not in problem else problem)
    print(f"note: sampling N(0, I): {problem}" + ("" if "quantized" in problem else f"; fit one with {fit}"))
    return None


def prior_latents(run: LoadedRun, n: int, temperature: float, seed: int, expost: ExpostPrior | None) -> torch.Tensor:
    """decode()d samples [n, ...] in the model's output range: of the ex-post prior when given, else the model's
    own prior (N(0, t^2 I); a quantized model's codes)."""
    g = torch.Generator().manual_seed(seed)
    if expost is None:
        return run.model.sample(n, temperature, generator=g)
    return run.model.decode(expost.sample(n, g, temperature).to(run.device))


@torch.no_grad()
def prior(run: LoadedRun, args, out: Outputs) -> list[Path]:
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    expost = expost_prior(run, args.prior)
    print(f"sampling the {prior_module.describe(expost) if expost else 'N(0, I) prior'}")
    if run.data_range is not None:
        return _prior_arrays(run, args, out, expost)
    grid_path = out.file(Path(args.out) if args.out else run.run_dir / "samples" / "prior.png")
    folder = out.folder(grid_path.with_suffix(""), ["[0-9]*.png"]) if args.separate else None
    score_path = out.file(grid_path.with_name(grid_path.stem + "-score.json")) if args.score else None
    images = media.to_uint8(prior_latents(run, args.n, args.temperature, args.seed, expost), run.model.output_range)
    written = [media.save_png(media.make_grid(images, nrow=math.ceil(math.sqrt(args.n))), grid_path)]
    if folder is not None:
        written += [media.save_png(img, folder / f"{i:04d}.png") for i, img in enumerate(images)]
    if score_path is not None:
        if args.score_samples < 1:
            raise UserError(f"--score-samples must be at least 1, got {args.score_samples}")
        scores = score_prior_samples(run, args.score, args.score_samples, args.seed, args.temperature,
                                     args.batch_size, expost)
        print(format_scores(scores))
        written.append(save_json(scores, score_path))
    return written


def _prior_arrays(run: LoadedRun, args, out: Outputs, expost: ExpostPrior | None) -> list[Path]:
    """Signals/volumes: OUT.npy [N, C, *spatial] float32 in data units, and OUT.png (the tiles media draws)."""
    if args.score:
        raise UserError("--score classifies images; signals and volumes have no classifier")
    path = out.file(Path(args.out) if args.out else run.run_dir / "samples" / "prior.npy")
    png = out.file(path.with_suffix(".png"))
    x = prior_latents(run, args.n, args.temperature, args.seed, expost).float()
    tiles = media.to_tiles(x, run.model.output_range)
    return [save_npy(run.to_data_units(x).cpu().numpy(), path),
            media.save_png(media.make_grid(tiles, nrow=math.ceil(math.sqrt(args.n))), png)]


@torch.no_grad()
def _reconstruct_arrays(run: LoadedRun, args, out: Outputs) -> list[Path]:
    """Signals/volumes: OUT/inputs.npy, OUT/recons.npy ([N, C, *spatial], data units), index.csv, preview.png."""
    if args.native_size or args.tile_size or args.tile_overlap is not None:
        raise UserError("--native-size, --tile-size and --tile-overlap are for images")
    folder = out.folder(Path(args.out) if args.out else run.run_dir / "samples" / "reconstruct",
                        ["inputs.npy", "recons.npy", "index.csv", "preview.png"])
    inputs, recons, index = [], [], []
    for batch, sources in Inputs(run, args.images, "val", args.batch_size).batches():
        x = run.to_model_range(batch.images)
        inputs.append(x)
        recons.append(reconstruction(run, x).float())
        index += [{"row": len(index) + i, "key": k, "source": s} for i, (k, s) in enumerate(zip(batch.keys, sources))]
    if not index:
        raise UserError(f"no readable samples in {', '.join(args.images)}")
    x, r = torch.cat(inputs), torch.cat(recons)
    n = min(len(x), 16)
    preview = media.make_grid(np.concatenate([media.to_tiles(x[:n], run.model.output_range),
                                              media.to_tiles(r[:n], run.model.output_range,
                                                             x[:n] if x.dim() == 3 else None)]), nrow=n)
    return [save_npy(run.to_data_units(x).cpu().numpy(), folder / "inputs.npy"),
            save_npy(run.to_data_units(r).cpu().numpy(), folder / "recons.npy"),
            save_csv(index, folder / "index.csv"), media.save_png(preview, folder / "preview.png")]


def reconstruct(run: LoadedRun, args, out: Outputs) -> list[Path]:
    if run.data_range is not None:
        return _reconstruct_arrays(run, args, out)
    if args.native_size:
        return _reconstruct_native(run, args, out)
    if args.tile_size or args.tile_overlap is not None:
        raise UserError("--tile-size and --tile-overlap apply with --native-size (without it images are resized "
                          "to the training size, one tile each)")
    path = out.file(Path(args.out) if args.out else run.run_dir / "samples" / "reconstruct.png")
    files = image_files(args.images)
    inputs, recons = [], []
    for i in range(0, len(files), args.batch_size):
        x = load_images(files[i:i + args.batch_size], run.image_size)
        inputs.append(x.permute(0, 2, 3, 1).numpy())
        recons.append(_reconstruct(run, x))
    return [media.save_png(_side_by_side(np.concatenate(inputs), np.concatenate(recons)), path)]


def _reconstruct_native(run: LoadedRun, args, out: Outputs) -> list[Path]:
    tile, overlap = _tile_options(run, args)
    f = tiling.check_tiling(run.model, tile, overlap)
    files = image_files(args.images)
    keys, _ = _folder_keys(files, args.images)
    folder = out.folder(Path(args.out) if args.out else run.run_dir / "samples" / "reconstruct", ["*.png"])
    written = []
    for file, key in zip(files, keys):
        x = load_native(file, f)
        recon = media.to_uint8(reconstruction(run, run.to_model_range(x), tile, overlap), run.model.output_range)
        pair = np.concatenate([x[0].permute(1, 2, 0).numpy(), recon[0]], axis=1)
        written.append(media.save_png(pair, folder / f"{key.replace('/', '_')}.png"))
    return written


@torch.no_grad()
def interpolation_frames(run: LoadedRun, image_a: torch.Tensor, image_b: torch.Tensor, steps: int) -> np.ndarray:
    """uint8 [steps, H, W, 3]: decode(slerp(mu_a, mu_b, t)), t = 0 ... 1 (media.interpolation_strips' tiles)."""
    mu_a, _ = run.model.encode(run.to_model_range(image_a))
    mu_b, _ = run.model.encode(run.to_model_range(image_b))
    z = torch.cat([media.slerp(mu_a, mu_b, t) for t in torch.linspace(0.0, 1.0, steps).tolist()])
    return media.to_uint8(run.model.decode(z), run.model.output_range)


def interpolate(run: LoadedRun, args, out: Outputs) -> list[Path]:
    if args.steps < 2:
        raise UserError(f"--steps must be at least 2, got {args.steps}")
    png = out.file(Path(args.out) if args.out else run.run_dir / "samples" / "interpolate.png")
    gif = out.file(png.with_suffix(".gif"))
    if not (Path(args.image_a).is_file() and Path(args.image_b).is_file()):
        raise UserError(f"interpolate needs two image files, got {args.image_a} and {args.image_b}")
    images = load_images([Path(args.image_a), Path(args.image_b)], run.image_size)
    frames = interpolation_frames(run, images[:1], images[1:2], args.steps)
    return [media.save_png(media.make_grid(frames, nrow=args.steps), png), save_gif(frames, gif)]


@torch.no_grad()
def traverse(run: LoadedRun, args, out: Outputs) -> list[Path]:
    if args.dims < 1:
        raise UserError(f"--dims must be at least 1, got {args.dims}")
    folder = out.folder(Path(args.out) if args.out else run.run_dir / "samples" / "traverse", ["dim-*.png"])
    if args.images:
        images = load_images(image_files(args.images), run.image_size)
    else:  # the first validation images of the run's shards rank the dimensions
        check_shards(run.cfg.data.shards, run.image_size)
        batches, n = [], 0
        for batch in split_batches(run.cfg, run.cfg.data.shards, "val", num_workers=0):
            batches.append(batch.images)
            n += len(batch.images)
            if n >= 64:
                break
        if not batches:
            raise UserError(f"the val split of {run.cfg.data.shards} is empty; pass --images")
        images = torch.cat(batches)[:64]
    x = run.to_model_range(images)
    mu, logvar = run.model.encode(x)
    if logvar is None:  # a quantized model: rank the dimensions of z_e by mean z_e^2 / 2 (a unit-variance "KL")
        logvar = torch.zeros_like(mu)
    dims = media.top_kl_dims(mu, logvar, args.dims)
    kl = media.kl_per_dim(mu, logvar)
    grids = media.latent_traversals(run.model, x[: args.rows], dims)
    written = [media.save_png(g, folder / f"dim-{d:04d}.png") for d, g in zip(dims, grids)]
    print("dimensions (highest KL first): " + ", ".join(f"{d} ({float(kl[d]):.3f} nats)" for d in dims))
    return written


@torch.no_grad()
def encode(run: LoadedRun, args, out: Outputs) -> list[Path]:
    """--format npy (one process); --format shards is pipeline.encode (see main)."""
    folder = out.folder(Path(args.out) if args.out else run.run_dir / "samples" / "latents",
                        ["mu.npy", "logvar.npy", "codes.npy", "index.csv", "meta.json"])
    inputs = Inputs(run, args.inputs, args.split, args.batch_size)
    quantizer = run.model.quantizer  # quantized: mu.npy is z_e, codes.npy the integer code maps, no logvar
    mus, logvars, codes, index = [], [], [], []
    for batch, sources in inputs.batches():
        mu, logvar = run.model.encode(run.to_model_range(batch.images))
        mus.append(mu.float().cpu().numpy())
        if quantizer is not None:
            codes.append(quantizer(mu).indices.cpu().numpy().astype(codes_dtype(quantizer.num_codes)))
        else:
            logvars.append(logvar.float().cpu().numpy())
        for i, key in enumerate(batch.keys):
            label = int(batch.labels[i])
            index.append({"row": len(index), "key": key, "label": label, "class": _class_name(run, label),
                          "source": sources[i]})
    if not index:
        raise UserError(f"no readable samples in {', '.join(args.inputs)} (split {args.split})")
    meta = {"run_dir": str(run.run_dir), "checkpoint": run.checkpoint.name, "step": run.step, "weights": run.weights,
            "image_size": run.image_size, "latent_shape": list(run.model.latent_shape), "count": len(index),
            "classes": run.classes, "inputs": [str(p) for p in args.inputs], "split": args.split,
            "format": args.format}
    if quantizer is not None:
        meta.update({"quantizer": quantizer.kind, "num_codes": quantizer.num_codes,
                     "code_grid": list(run.model.code_grid)})
    second = (save_npy(np.concatenate(codes), folder / "codes.npy") if quantizer is not None
              else save_npy(np.concatenate(logvars), folder / "logvar.npy"))
    written = [save_npy(np.concatenate(mus), folder / "mu.npy"), second,
               save_csv(index, folder / "index.csv"), save_json(meta, folder / "meta.json")]
    print(f"encoded {len(index)} samples")
    return written


def _shard_latents(folder: Path, member: str) -> Iterator[tuple[str, np.ndarray]]:
    """(key, float32 latent) of every sample of a latent shards folder (pipeline.encode's manifest),
    in manifest order. Only `<key>.<member>.npy` members are read, with np.load(allow_pickle=False)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / 'manifest.json'} is not valid JSON ({e}); encode the folder again") from None
    if manifest.get("kind") != "latents":
        raise UserError(f"{folder} holds image shards, not latents; decode takes what `encode --format shards` "
                          f"writes (or .npy files)")
    if f"{member}.npy" not in manifest.get("members", []):
        raise UserError(f"latent shards {folder} store {', '.join(manifest.get('members', []))}, not {member}.npy; "
                          f"pass --latent with one of those")
    bf16 = manifest.get("latent_dtype") == "bfloat16"
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = durable.inside(folder, shard["file"], f"{folder / 'manifest.json'}")
            with tarfile.open(path) as tar:
                for info in tar:
                    key, _, ext = info.name.partition(".")
                    if ext != f"{member}.npy" or not info.isfile():
                        continue
                    durable.sample_key(key, f"latent shard {path}")  # it becomes an output file name
                    arr = np.load(io.BytesIO(tar.extractfile(info).read()), allow_pickle=False)
                    if member == "codes":  # integer code maps, decoded through the codebook
                        yield key, arr.astype(np.int64)
                        continue
                    if bf16:
                        arr = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float().numpy()
                    yield key, arr.astype(np.float32)


def _npy_latents(path: Path, latent_dims: int, code_dims: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, latent) of a .npy file: float latents, or (code_dims given: a quantized model) integer code maps."""
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - a bad file is the user's file
        raise UserError(f"cannot read {path} as a .npy array ({describe_error(e)})") from None
    if np.issubdtype(arr.dtype, np.integer):
        if code_dims is None:
            raise UserError(f"{path} holds integers (code maps) but this run's latent is not quantized; decode "
                              f"float latents (encode's mu.npy) or use a quantized run")
        if arr.ndim not in (code_dims, code_dims + 1):
            raise UserError(f"{path} holds codes of shape {list(arr.shape)}; decode needs one code map "
                              f"({code_dims} dims) or a batch of them ({code_dims + 1} dims)")
        rows = [arr] if arr.ndim == code_dims else list(arr)
        for i, row in enumerate(rows):
            yield (path.stem if arr.ndim == code_dims else f"{path.stem}-{i:04d}"), row.astype(np.int64)
        return
    if arr.ndim == latent_dims:
        yield path.stem, arr.astype(np.float32)
    elif arr.ndim == latent_dims + 1:
        for i, row in enumerate(arr):
            yield f"{path.stem}-{i:04d}", row.astype(np.float32)
    else:
        raise UserError(f"{path} holds an array of shape {list(arr.shape)}; decode needs one latent "
                          f"({latent_dims} dims) or a batch of them ({latent_dims + 1} dims)")


@torch.no_grad()
def decode(run: LoadedRun, args, out: Outputs) -> list[Path]:
    tile, overlap = _tile_options(run, args)
    ext = "png" if args.format == "png" else "npy"
    folder = out.folder(Path(args.out) if args.out else run.run_dir / "samples" / "decoded", [f"*.{ext}"])
    model, shape = run.model, tuple(run.model.latent_shape)
    code_dims = len(model.code_grid) if model.quantizer is not None else None

    def latents() -> Iterator[tuple[str, np.ndarray]]:
        for p in map(Path, args.latents):
            if (p / "manifest.json").is_file():
                yield from _shard_latents(p, args.latent)
            elif p.is_dir():
                files = sorted(p.glob("*.npy"))
                if not files:
                    raise UserError(f"folder {p} holds no .npy files or latent shards")
                for f in files:
                    yield from _npy_latents(f, len(shape), code_dims)
            elif p.is_file():
                yield from _npy_latents(p, len(shape), code_dims)
            else:
                raise UserError(f"{p} does not exist; give .npy files, folders of them or latent shards folders")

    def flush(keys: list[str], zs: list[np.ndarray]) -> list[Path]:
        z = torch.from_numpy(np.stack(zs)).to(run.device)
        if not z.is_floating_point():  # code maps of a quantized model
            if tuple(z.shape[1:]) != tuple(model.code_grid) or int(z.min()) < 0 or int(z.max()) >= model.quantizer.num_codes:
                raise UserError(f"codes {keys[0]} have shape {list(z.shape[1:])} and values {int(z.min())}.."
                                  f"{int(z.max())}, but the model takes {list(model.code_grid)} codes in "
                                  f"0..{model.quantizer.num_codes - 1}")
            images = model.decode_indices(z)
        elif z.shape[1:] == shape:
            images = model.decode(z)
        elif len(shape) == 3 and z.shape[1] == shape[0]:
            images = tiling.tiled_decode(model, z, tile, overlap)
        else:
            raise UserError(f"latent {keys[0]} has shape {list(z.shape[1:])} but the model's is {list(shape)}"
                              + (" (larger spatial latents need a spatial-latent model)" if len(shape) == 3 else ""))
        if ext == "png":
            u8 = media.to_uint8(images, model.output_range)
            return [media.save_png(u8[i], folder / f"{k}.png") for i, k in enumerate(keys)]
        unit = to_unit_range(images.float(), model.output_range).permute(0, 2, 3, 1).cpu().numpy()
        return [save_npy(unit[i], folder / f"{k}.npy") for i, k in enumerate(keys)]

    written: list[Path] = []
    keys: list[str] = []
    zs: list[np.ndarray] = []
    for key, z in latents():
        if zs and (len(zs) == args.batch_size or z.shape != zs[0].shape):
            written += flush(keys, zs)
            keys, zs = [], []
        keys.append(key.replace("/", "_"))
        zs.append(z)
    if zs:
        written += flush(keys, zs)
    if not written:
        raise UserError(f"no latents in {', '.join(args.latents)}")
    print(f"decoded {len(written)} latents into {folder}")
    return written


@torch.no_grad()
def anomaly_scores(run: LoadedRun, batches: Callable[[], Iterable[tuple[Batch, list[str]]]], k: int, seed: int,
                   log_scale: float | None, top_k: int = 0):
    """Per-sample rows {key, label, class, source, neg_elbo_nats, neg_elbo_bits_per_dim, recon_mse} and the top_k
    (score, input uint8 HxWx3, reconstruction) by -ELBO. An l1/mse likelihood without `log_scale` gets its
    maximum-likelihood scale from the scored images first (one extra pass). Returns (rows, top, log_scale).
    A quantized model has no ELBO: it is scored by recon_mse (neg_elbo_* are None)."""
    model, kind = run.model, run.cfg.loss.recon
    quantized = model.quantizer is not None
    if kind in ("l1", "mse") and log_scale is None and not quantized:
        err, n = 0.0, 0
        for batch, _ in batches():
            x = run.to_model_range(batch.images)
            mu, logvar = model.encode(x)
            z = mu + key_noise(batch.keys, model.latent_shape, 1, seed, run.device)[0] * torch.exp(0.5 * logvar)
            e = model.decode(z).float() - x
            err += float((e.abs() if kind == "l1" else e.square()).sum())
            n += x.shape[0]
        log_scale = fixed_log_scale(kind, err / max(1, n * run.pixel_dims))
    rows, top = [], []
    for batch, sources in batches():
        x = run.to_model_range(batch.images)
        mu, logvar = model.encode(x)
        recon = model.decode(mu)
        mse = (to_unit_range(recon, model.output_range) - to_unit_range(x, model.output_range)
               ).square().flatten(1).mean(1).cpu()
        if quantized:
            neg_elbo = None
        else:
            log_px, _ = log_weights(run, x, mu, logvar, list(batch.keys), k, seed, log_scale, 256)
            neg_elbo = (-log_px.mean(0) + kl_per_dim(mu, logvar).double().sum(1)).cpu()
        recon_u8 = media.to_uint8(recon, model.output_range)
        for i, key in enumerate(batch.keys):
            label = int(batch.labels[i])
            score = float(neg_elbo[i]) if neg_elbo is not None else float(mse[i])
            rows.append({"key": key, "label": label, "class": _class_name(run, label), "source": sources[i],
                         "neg_elbo_nats": None if quantized else score,
                         "neg_elbo_bits_per_dim": None if quantized else score / (run.pixel_dims * LN2),
                         "recon_mse": float(mse[i])})
            if top_k:
                top.append((score, batch.images[i].permute(1, 2, 0).numpy().copy(), recon_u8[i]))
        top = sorted(top, key=lambda t: -t[0])[:top_k]
    rows.sort(key=lambda r: -(r["recon_mse"] if quantized else r["neg_elbo_nats"]))
    return [{"rank": rank, **row} for rank, row in enumerate(rows, 1)], top, log_scale


def _evaluated_log_scale(run: LoadedRun) -> float | None:
    """The l1/mse scale pipeline.evaluate fitted on this checkpoint's val split, if it has run."""
    path = run.run_dir / "eval" / "metrics.json"
    if run.cfg.loss.recon not in ("l1", "mse") or not path.is_file():
        return None
    m = json.loads(path.read_text())
    same = m.get("checkpoint") == run.checkpoint.name and m.get("weights") == run.weights
    value = m.get("likelihood_log_scale")
    return float(value) if same and isinstance(value, (int, float)) else None


def anomaly(run: LoadedRun, args, out: Outputs) -> list[Path]:
    if args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}")
    path = out.file(Path(args.out) if args.out else run.run_dir / "samples" / "anomaly.csv")
    png = out.file(path.with_name(f"{path.stem}-top{args.top_k}.png")) if args.top_k > 0 else None
    inputs = Inputs(run, args.inputs, args.split, args.batch_size)
    rows, top, scale = anomaly_scores(run, inputs.batches, args.samples, args.seed, _evaluated_log_scale(run),
                                      args.top_k)
    if not rows:
        raise UserError(f"no readable samples in {', '.join(args.inputs)}")
    written = [save_csv(rows, path)]
    if png is not None and top:
        written.append(media.save_png(_side_by_side(np.stack([t[1] for t in top]), np.stack([t[2] for t in top])),
                                      png))
    scale_note = f", likelihood log-scale {scale:.4f}" if scale is not None else ""
    worst = rows[0]
    figure = (f"{worst['neg_elbo_bits_per_dim']:.4f} bits/dim" if worst["neg_elbo_bits_per_dim"] is not None
              else f"reconstruction MSE {worst['recon_mse']:.5f}: a quantized model has no ELBO")
    print(f"scored {len(rows)} images{scale_note}; worst: {worst['key']} ({figure})")
    return written


MODES = {"prior": prior, "reconstruct": reconstruct, "interpolate": interpolate, "traverse": traverse,
         "encode": encode, "decode": decode, "anomaly": anomaly}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", help="output file or folder (default under RUN_DIR/samples/)")
    common.add_argument("--force", action="store_true", help="replace an existing output")
    common.add_argument("--checkpoint", help="checkpoint name (step-000500) or folder; default: the latest")
    common.add_argument("--weights", choices=("ema", "raw"), default="ema")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--device", help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    common.add_argument("--batch-size", type=int, default=64, help="images per model call")
    common.add_argument("--image-size", type=int, help="the shards' SIZE, only needed when the run's shards are gone")

    p = argparse.ArgumentParser(prog="python -m pipeline.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the run folder training wrote (runs/<run.name>)")
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    m = modes.add_parser("prior", parents=[common], help="decode samples of the prior")
    m.add_argument("--n", type=int, default=64)
    m.add_argument("--temperature", type=float, default=1.0, help="scale of z ~ N(0, t^2 I)")
    m.add_argument("--separate", action="store_true", help="also one PNG per sample, in a folder beside the grid")
    m.add_argument("--prior", choices=("expost", "normal"),
                   help="expost: the Gaussian mixture fitted to the train posterior means (RUN_DIR/"
                        "expost_prior.safetensors); normal: N(0, I). Default: expost when the run has one for "
                        "the loaded weights, else normal with a note")
    m.add_argument("--score", metavar="CLASSIFIER", help="also score N(0, I) samples, ex-post samples and val images "
                   "with this pipeline.classifier file (pipeline.sample_score); writes OUT-score.json")
    m.add_argument("--score-samples", type=int, default=500, help="images per scored set (default 500)")
    tiles = argparse.ArgumentParser(add_help=False)
    tiles.add_argument("--tile-size", type=int, help="spatial latents: tile side in px for images larger than it "
                                                     "(default: the training size)")
    tiles.add_argument("--tile-overlap", type=int, help="px shared by neighbouring tiles, blended (default: a quarter "
                                                        "of the tile)")
    m = modes.add_parser("reconstruct", parents=[common, tiles], help="images beside their reconstructions")
    m.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    m.add_argument("--native-size", action="store_true",
                   help="keep each image's size (spatial latents, tiled); OUT is a folder of one PNG per image")
    m = modes.add_parser("interpolate", parents=[common], help="slerp between two images' latents")
    m.add_argument("image_a", metavar="A")
    m.add_argument("image_b", metavar="B")
    m.add_argument("--steps", type=int, default=10)
    m = modes.add_parser("traverse", parents=[common], help="walk the highest-KL latent dimensions")
    m.add_argument("--dims", type=int, default=4, help="how many dimensions (highest KL first)")
    m.add_argument("--rows", type=int, default=4, help="images (rows) per grid")
    m.add_argument("--images", nargs="+", metavar="IMAGE_OR_FOLDER", help="default: the run's val images")
    m = modes.add_parser("encode", parents=[common, tiles], help="mu and logvar of every sample")
    m.add_argument("inputs", nargs="+", metavar="SHARDS_OR_FOLDER")
    m.add_argument("--split", choices=("val", "train", "all"), default="all", help="for shards folders")
    m.add_argument("--format", choices=("npy", "shards"), default="npy",
                   help="shards: latent shards, any number of processes, resumable (pipeline.encode)")
    m.add_argument("--store", default="mu", help="shards: comma list of mu, logvar, z (z seeded by key and --seed), "
                                                  "codes (quantized models: integer code maps)")
    m.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="shards: stored dtype")
    m.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="shards: model precision; auto = bf16 autocast on GPU, fp32 on CPU")
    m.add_argument("--num-workers", type=int, default=2, help="shards: data loader workers per process")
    m.add_argument("--compile", action="store_true", help="shards: torch.compile the encoder")
    m = modes.add_parser("decode", parents=[common, tiles], help="latents (.npy or latent shards) back to images")
    m.add_argument("latents", nargs="+", metavar="NPY_OR_LATENT_SHARDS")
    m.add_argument("--format", choices=("png", "npy"), default="png", help="npy: float32 [H, W, 3] in [0, 1]")
    m.add_argument("--latent", choices=("mu", "z", "codes"), default="mu",
                   help="which member of latent shards to decode (codes: a quantized run's integer code maps)")
    m = modes.add_parser("anomaly", parents=[common], help="score images by -ELBO, worst first")
    m.add_argument("inputs", nargs="+", metavar="IMAGES_OR_SHARDS")
    m.add_argument("--split", choices=("val", "train", "all"), default="val", help="for shards folders")
    m.add_argument("--top-k", type=int, default=16, help="outliers shown in the PNG (0: none)")
    m.add_argument("--samples", type=int, default=16, help="samples of z per image for the -ELBO")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[Path]:
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.mode == "encode" and args.format == "shards":  # distributed, resumable: its own module
        from pipeline.encode import run_encode

        config = Path(args.run_dir) / "config.yaml"
        if config.is_file() and load_config(config, check_paths=False).model.spatial_dims != 2:
            raise UserError("encode --format shards reads image shards; for signals and volumes use "
                              "encode --format npy")
        code = run_encode(args)
        if code:
            sys.exit(code)
        return []
    run = load_run(args.run_dir, (), args.checkpoint, args.weights, args.device, args.image_size)
    if args.mode not in ("prior", "reconstruct", "encode"):
        _refuse_for_arrays(run, args.mode)
    written = MODES[args.mode](run, args, Outputs(args.force))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
    sys.exit(0)
