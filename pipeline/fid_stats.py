"""rFID's reference statistics: the Inception feature moments of a split's real images, computed once, cached
beside the shards and reused by every evaluation and validation pass of that split.

    python -m pipeline.fid_stats shards/flowers --inception-weights weights/weights-inception-2015-12-05-6726825d.pth
    accelerate launch --multi_gpu --num_processes 8 -m pipeline.fid_stats shards/imagenet256 --inception-weights F
    make fid-stats NAME=flowers INCEPTION=weights/weights-inception-2015-12-05-6726825d.pth

    metrics = field_metrics(cfg, shards, split, accelerator)   # ReconstructionMetrics with the split's reference

pipeline.evaluate and training's validation (metrics.in_validation) call field_metrics(): with an Inception
file, the reference is read from the cache (one line: where from), or computed by one pass over the split
and written there; each evaluation then runs Inception on the reconstructions only.

The file: SHARDS/fid_stats/<split>-<size>px-<PROTOCOL_TAG>-pool<features>-<inception sha256[:12]>.safetensors,
written durably (pipeline.durable). If SHARDS cannot be written (a read-only data folder), it goes to
CACHE_ENV (default ~/.cache/vae-pipeline/fid_stats)/<shards name>-<manifest sha256[:12]>/ instead, said in
one line; reads look in both. It holds float64 tensors count [1], feature_sum [D] and feature_outer [D, D]
(n, sum f, sum f f^T: FeatureMoments; mean and covariance follow) and one metadata entry, `fid_reference`,
a JSON record of:
- what the statistics are of, all compared on every read: format, split, image_size, manifest_sha256 (the
  shards' manifest.json, which lists every shard's sha256), inception_sha256 (the weights file),
  feature_layer, protocol (how images reach the network) and torch_fidelity (its version: the network's
  resize code). Any difference: one line naming the fields, then recomputed; never silently reused;
- what they hold: count, pixel_sum (the sum of every uint8 value: the evaluation checks that it scored the
  same images) and tensors_sha256 (of the tensors' bytes: a torn or garbled file is one line, recomputed).

All images of the split are used. Every rank runs Inception on its share, the float32 features are
gathered, ordered by the hash of their sample key, and summed image by image in that order in float64
(each product of two float32 values is exact in float64): 1 and N processes write the same bytes as long
as Inception gives each image the same features (bitwise on CPU with the same thread count; GPUs and
thread counts can differ in the last float32 bit of a feature).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file (`accelerate launch pipeline/fid_stats.py ...`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from pipeline import durable
from pipeline.config import Config, ConfigError, exit_on_config_error
from pipeline.errors import UserError
from pipeline.metrics import FID_FEATURE_LAYERS, FeatureMoments, ReconstructionMetrics, load_inception

FORMAT = 1
"""Version of the file's layout; a file of another version is recomputed."""

PROTOCOL_TAG = "tf299"
PROTOCOL = ("uint8 RGB images as the shards hold them (SIZE x SIZE: make shards' central square, antialiased "
            "bicubic resize, then the shards' image format), all of them; torch-fidelity inception-v3-compat "
            "resizes the whole image to 299x299 with TF 1.x bilinear (align_corners=False, no crop, no padding) "
            "and scales it to [-1, 1]")
"""How an image reaches the network: part of the file's identity (and, by PROTOCOL_TAG, of its name)."""

CACHE_ENV = "FID_STATS_CACHE"
"""Environment variable naming the fallback folder for read-only shard folders."""

IDENTITY = ("format", "split", "image_size", "manifest_sha256", "inception_sha256", "feature_layer", "protocol",
            "torch_fidelity")
"""The record's fields that must equal the current ones for a cached file to be used."""


@dataclass
class Reference:
    """The real images' moments of one split, and what the evaluation checks it scored the same images by."""

    moments: FeatureMoments
    pixel_sum: int
    path: Path | None


# --------------------------------------------------------------------------------------------
# Where, and of what
# --------------------------------------------------------------------------------------------


def identity(shards: str | Path, split: str, weights: str | Path, features: int) -> dict:
    """The record fields a cached file must match (IDENTITY), for these shards, split, weights and layer."""
    import torch_fidelity

    from pipeline.data import read_manifest

    manifest = read_manifest(shards)
    if manifest.get("kind", "image") != "image":
        raise ConfigError(f"rFID works on 2-D images only and {shards} holds {manifest['kind']}s; leave "
                          f"metrics.inception_weights empty for signals and volumes")
    if split not in ("train", "val"):
        raise ConfigError(f"--split must be train or val, got {split!r}")
    if features not in FID_FEATURE_LAYERS:
        raise ConfigError(f"metrics.fid_features is {features} but must be one of "
                          f"{', '.join(map(str, FID_FEATURE_LAYERS))} (2048 is the FID papers report)")
    if not Path(weights).is_file():
        raise ConfigError(f"metrics.inception_weights file {weights} does not exist; give the path of the "
                          f"downloaded weights file")
    return {"format": FORMAT, "split": split, "image_size": int(manifest["size"]),
            "manifest_sha256": durable.sha256_file(Path(shards) / "manifest.json"),
            "inception_sha256": durable.sha256_file(weights), "feature_layer": features, "protocol": PROTOCOL,
            "torch_fidelity": torch_fidelity.__version__}


def file_name(ident: dict) -> str:
    return (f"{ident['split']}-{ident['image_size']}px-{PROTOCOL_TAG}-pool{ident['feature_layer']}-"
            f"{ident['inception_sha256'][:12]}.safetensors")


def locations(shards: str | Path, ident: dict) -> tuple[Path, Path]:
    """(beside the shards, the fallback cache folder) for this identity's file."""
    shards = Path(shards)
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vae-pipeline" / "fid_stats")
    name = file_name(ident)
    return (shards / "fid_stats" / name,
            root / f"{shards.resolve().name}-{ident['manifest_sha256'][:12]}" / name)


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


def _tensors(ref: Reference) -> dict[str, torch.Tensor]:
    m = ref.moments
    return {"count": m.n.reshape(1).double().cpu().contiguous(), "feature_sum": m.sum.double().cpu().contiguous(),
            "feature_outer": m.outer.double().cpu().contiguous()}


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].numpy().tobytes())
    return h.hexdigest()


def write(path: Path, ref: Reference, ident: dict) -> None:
    """The safetensors file of `ref` with its record (module docstring), written durably."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = _tensors(ref)
    record = {**ident, "count": int(ref.moments.n.item()), "pixel_sum": ref.pixel_sum,
              "tensors_sha256": _tensors_sha256(tensors)}
    # One metadata entry: safetensors keeps metadata in a hash map, so several entries could be written in
    # any order, and the same statistics would not always give the same bytes.
    meta = {"fid_reference": json.dumps(record, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)  # safetensors creates 0600; the shards folder is shared, like its manifest

    durable.write_with(path, save, errors=(SafetensorError,))


def read(path: Path, ident: dict, device: torch.device | str = "cpu") -> tuple[Reference | None, str]:
    """(the file's reference, "") when it is whole and of `ident`; (None, why not) otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            record = json.loads((f.metadata() or {})["fid_reference"])
            tensors = {k: f.get_tensor(k) for k in ("count", "feature_sum", "feature_outer")}
    except Exception as e:  # noqa: BLE001 - a torn or garbled file fails in safetensors, json or a missing key
        return None, f"unreadable ({(str(e).splitlines() or [type(e).__name__])[0][:120]})"
    if not isinstance(record, dict):
        return None, "unreadable (its record is not a JSON object)"
    differ = [k for k in IDENTITY if record.get(k) != ident[k]]
    if differ:
        return None, "stale (" + ", ".join(f"{k} differs" for k in differ) + ")"
    dims = ident["feature_layer"]
    shapes = {"count": (1,), "feature_sum": (dims,), "feature_outer": (dims, dims)}
    if any(tuple(tensors[k].shape) != s or tensors[k].dtype != torch.float64 for k, s in shapes.items()) \
            or _tensors_sha256(tensors) != record.get("tensors_sha256") \
            or record.get("count") != int(tensors["count"].item()) or not isinstance(record.get("pixel_sum"), int):
        return None, "garbled (its tensors do not match their recorded sha256 or shapes)"
    moments = FeatureMoments(dims, device)
    moments.n, moments.sum, moments.outer = (tensors["count"][0].to(device), tensors["feature_sum"].to(device),
                                             tensors["feature_outer"].to(device))
    return Reference(moments, record["pixel_sum"], path), ""


# --------------------------------------------------------------------------------------------
# Computing: every image of the split, reduced in a fixed order
# --------------------------------------------------------------------------------------------


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little", signed=True)


def _gather(accelerator, local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `local` [n_r, ...] concatenated in rank order (ranks may hold different n_r)."""
    if accelerator is None or accelerator.num_processes == 1:
        return local
    counts = accelerator.gather(torch.tensor([local.shape[0]], device=local.device)).tolist()
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:local.shape[0]] = local
    rows = accelerator.gather(padded).reshape(len(counts), max(counts), *local.shape[1:])
    return torch.cat([rows[r, :c] for r, c in enumerate(counts)])


@torch.no_grad()
def compute(batches, inception: torch.nn.Module, features: int, device: torch.device | str,
            accelerator=None) -> Reference:
    """The reference of every image `batches` yields on this rank, over all ranks; the same on every rank."""
    feats, hashes, pixels = [], [], []
    for batch in batches:
        images = batch.images.to(device)
        feats.append(inception(images)[0].float())  # [B, features]
        hashes.append(torch.tensor([_key_hash(k) for k in batch.keys], dtype=torch.int64, device=device))
        pixels.append(images.flatten(1).sum(1, dtype=torch.int64))
    local_feats = torch.cat(feats) if feats else torch.zeros(0, features, device=device)
    local_hashes = torch.cat(hashes) if hashes else torch.zeros(0, dtype=torch.int64, device=device)
    local_pixels = torch.cat(pixels) if pixels else torch.zeros(0, dtype=torch.int64, device=device)
    all_feats, all_hashes = _gather(accelerator, local_feats), _gather(accelerator, local_hashes)
    pixel_sum = int(_gather(accelerator, local_pixels).sum().item())  # integers: exact in any order
    order = torch.sort(all_hashes, stable=True).indices  # keys are content hashes: distinct within a split
    moments = FeatureMoments(features, device)
    for f in all_feats[order].double():  # image by image: elementwise and exact products, one rounding per add
        moments.sum.add_(f)
        moments.outer.add_(torch.outer(f, f))
    moments.n += all_feats.shape[0]
    return Reference(moments, pixel_sum, None)


# --------------------------------------------------------------------------------------------
# Read or compute, and write
# --------------------------------------------------------------------------------------------


def reference(cfg: Config, shards: str | Path, split: str, inception: torch.nn.Module, accelerator=None,
              say: Callable[[str], None] | None = print, weights: str | None = None,
              features: int | None = None) -> Reference:
    """The split's reference: from the cache when a whole file of this identity is there, else computed
    (collective: every rank calls this) and written by the main process. `say`: the main process's printer."""
    weights = weights or cfg.metrics.inception_weights
    features = features or cfg.metrics.fid_features
    device = accelerator.device if accelerator is not None else "cpu"
    say = say or (lambda line: None)
    ident = identity(shards, split, weights, features)
    where = f"rfid reference statistics of the {split} split of {shards}"
    found, problems = None, []
    for path in locations(shards, ident):
        if path.is_file():
            found, why = read(path, ident, device)
            if found is not None:
                break
            problems.append(f"{path} is {why}")
    world = accelerator.num_processes if accelerator is not None else 1
    if world > 1:  # every rank must agree, or some would wait in the computation's gather
        have = accelerator.reduce(torch.tensor([float(found is not None)], device=device), "sum")
        found = found if have.item() == world else None
    if found is not None:
        say(f"{where}: {int(found.moments.n.item())} images, from {found.path}")
        return found
    for p in problems:
        say(f"{where}: {p}; recomputing")
    from pipeline.inference import split_batches

    rank = accelerator.process_index if accelerator is not None else 0
    ref = compute(split_batches(cfg, shards, split, rank, world), inception, features, device, accelerator)
    if ref.moments.n.item() < 2:
        raise ConfigError(f"the {split} split of {shards} holds {int(ref.moments.n.item())} readable images; rFID "
                          f"needs at least 2")
    if accelerator is None or accelerator.is_main_process:
        ref.path = _store(ref, ident, shards, say, where)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the file is complete before any rank goes on
    return ref


def _store(ref: Reference, ident: dict, shards: str | Path, say: Callable[[str], None], where: str) -> Path | None:
    primary, fallback = locations(shards, ident)
    try:
        write(primary, ref, ident)
        say(f"{where}: {int(ref.moments.n.item())} images, computed and written to {primary}")
        return primary
    except (OSError, UserError) as e:  # durable writes fail with a UserError sentence
        reason = str(e).split(";")[0]
    try:
        write(fallback, ref, ident)
    except (OSError, UserError) as e:  # durable writes fail with a UserError sentence
        say(f"{where}: computed, but neither {primary.parent} ({reason}) nor {fallback.parent} "
            f"({str(e).split(';')[0]}) could be written; the statistics are used for this run only")
        return None
    say(f"{where}: {shards} is not writable ({reason}), so they are cached in {fallback} (set {CACHE_ENV} "
        f"to choose that folder)")
    return fallback


def field_metrics(cfg: Config, shards: str | Path, split: str, accelerator) -> ReconstructionMetrics:
    """ReconstructionMetrics.build of cfg.metrics, with the split's rFID reference attached when it has rFID."""
    say = accelerator.print if accelerator.is_main_process else None
    metrics = ReconstructionMetrics.build(cfg.metrics, accelerator.device, say)
    if metrics.inception is not None:
        metrics.reference = reference(cfg, shards, split, metrics.inception, accelerator, say)
    return metrics


# --------------------------------------------------------------------------------------------
# python -m pipeline.fid_stats
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.fid_stats",
                                description="Compute (or check) rFID's reference statistics of a shards split and "
                                            "cache them in SHARDS/fid_stats/, where evaluations read them.")
    p.add_argument("shards", help="the shards folder (shards/NAME)")
    p.add_argument("--inception-weights", metavar="FILE", required=True,
                   help="torch-fidelity's InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth)")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--features", type=int, default=2048, help="Inception feature layer: 2048 (pool3, what papers "
                                                                "report) | 768 | 192 | 64; = metrics.fid_features")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception call on each process")
    p.add_argument("--workers", type=int, default=2, help="shard reader processes per process")
    return p


@exit_on_config_error
def main(argv: list[str] | None = None) -> Reference:
    from accelerate import Accelerator

    args = _parser().parse_args(argv)
    accelerator = Accelerator()
    cfg = Config()
    cfg.data.shards, cfg.data.val_batch_size_per_device, cfg.data.num_workers = args.shards, args.batch_size, args.workers
    cfg.metrics.inception_weights, cfg.metrics.fid_features = args.inception_weights, args.features
    identity(args.shards, args.split, args.inception_weights, args.features)  # its sentences before the load
    inception = load_inception(args.inception_weights, accelerator.device, args.features)
    say = accelerator.print if accelerator.is_main_process else None
    ref = reference(cfg, args.shards, args.split, inception, accelerator, say)
    return ref


if __name__ == "__main__":
    main()
    sys.exit(0)
