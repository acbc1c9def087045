"""The shard set's manifest.json: what a shard folder holds, checked before anything reads it."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np

from pipeline import durable
from pipeline.config import Config
from pipeline.errors import ConfigError, UserError
from pipeline.durable import inside
# The format pipeline.shards writes, defined there: that module stays free of torch for its worker processes.
from pipeline.shards import MANIFEST_FORMAT

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "png", "webp", "npy")
"""Image member extensions the reader decodes (the only ones pipeline.shards writes)."""


def read_manifest(shards_dir: str | Path) -> dict:
    """Load and check `<shards_dir>/manifest.json`; a problem raises UserError (ConfigError for a
    data.shards that is no shards folder) with one sentence."""
    d = Path(shards_dir)
    path = d / "manifest.json"
    redo = f"re-run `make shards ... NAME={d.name}`"
    if not path.is_file():
        raise ConfigError(f"data.shards folder {d} has no manifest.json; build it with "
                          f"`make shards SRC=<image folder> NAME={d.name}` (or `make demo-data`)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {redo}") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        got = m.get("format") if isinstance(m, dict) else None
        raise UserError(f"{path} has format {got!r} but this reader needs format {MANIFEST_FORMAT}; {redo}")
    try:
        size, fmt, classes = int(m["size"]), m["image_format"], list(m["classes"])
        for split in ("train", "val"):
            for s in m["splits"][split]["shards"]:
                s["file"], s["count"] = str(s["file"]), int(s["count"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} lacks a valid field {e}; {redo}") from None
    if fmt not in IMAGE_EXTS:
        raise UserError(f"{path} has image_format {fmt!r}; the reader decodes only {', '.join(IMAGE_EXTS)}")
    if size < 1 or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path} has an invalid size or class list; {redo}")
    if m.get("kind", "image") != "image":
        _check_array_fields(m, path, redo)
    for split in ("train", "val"):
        for s in m["splits"][split]["shards"]:
            inside(d, s["file"], f"{path} ({split} shard)")  # never a path that leaves the shard folder
            if not (d / s["file"]).is_file():
                raise UserError(f"shard {d / s['file']} listed in {path} is missing; {redo} "
                                  f"(`make verify NAME={d.name}` checks every shard)")
    return m


def _check_array_fields(m: dict, path: Path, redo: str) -> None:
    """Array shards (pipeline.shards --spatial-dims 1|3): the fields the readers and the model use."""
    try:
        shape = [int(s) for s in m["sample_shape"]]
        dims, low, high = int(m["spatial_dims"]), float(m["normalization"]["low"]), float(m["normalization"]["high"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} lacks a valid array field {e}; {redo}") from None
    if m["kind"] != "array" or m.get("dtype") != "float32" or m["image_format"] != "npy":
        raise UserError(f"{path} describes {m['kind']!r} samples of {m.get('dtype')!r} in {m['image_format']!r}; "
                          f"this reader reads float32 npy arrays; {redo}")
    if dims not in (1, 3) or len(shape) != dims + 1 or min(shape) < 1 or not low < high:
        raise UserError(f"{path} has an invalid sample_shape, spatial_dims or normalization; {redo}")


def spatial_dims(manifest: dict) -> int:
    """1, 2 or 3: image shards (and manifests written before arrays existed) are 2."""
    return int(manifest.get("spatial_dims", 2))


def sample_shape(manifest: dict) -> tuple[int, ...]:
    """[C, *spatial] of an array set; empty for images (uint8 [H, W, 3] as decoded)."""
    return tuple(int(s) for s in manifest["sample_shape"]) if manifest.get("kind") == "array" else ()


def data_range(manifest: dict) -> tuple[float, float] | None:
    """(low, high) that array values are normalised from (manifest normalization); None for images."""
    n = manifest.get("normalization") if manifest.get("kind") == "array" else None
    return (float(n["low"]), float(n["high"])) if n else None


def batch_layout(manifest: dict, batch_size: int) -> tuple[tuple[int, ...], type]:
    """(batch memory shape, numpy dtype) the readers fill: uint8 [B, H, W, 3] images or float32 [B, C, *spatial]."""
    shape = sample_shape(manifest)
    if shape:
        return (batch_size, *shape), np.float32
    size = int(manifest["size"])
    return (batch_size, size, size, 3), np.uint8


def check_fits(cfg: Config, manifest: dict, where: str) -> None:
    """The recipe's model.spatial_dims and in_channels against the shards (`where`: the shards folder)."""
    dims = spatial_dims(manifest)
    if cfg.model.spatial_dims != dims:
        kind = {1: "1-D signals", 2: "2-D images", 3: "3-D volumes"}[dims]
        raise ConfigError(f"data.shards {where} holds {kind} but model.spatial_dims is {cfg.model.spatial_dims}; "
                          f"set model.spatial_dims={dims}")
    shape = sample_shape(manifest)
    if shape and cfg.model.in_channels != shape[0]:
        raise ConfigError(f"data.shards {where} holds samples of shape {list(shape)} ([C, *spatial]) but "
                          f"model.in_channels is {cfg.model.in_channels}; set model.in_channels={shape[0]}")


def checked_shards(shards_dir: str | Path, manifest: dict, split: str, verify: str = "size",
            on_damaged: str = "stop") -> tuple[tuple[str, int], ...]:
    """(path, count) of the split's shards, each checked against the manifest first (`verify`: size, or
    size and sha256). A damaged shard stops the run in one sentence; with on_damaged="skip" it is left
    out, with "read" kept (the reader skips what does not decode); either way named in one warning."""
    d = Path(shards_dir)
    good, damaged = [], []
    for s in manifest["splits"][split]["shards"]:
        path = inside(d, s["file"], f"{d / 'manifest.json'} ({split} shard)")
        problem = shard_damage(path, s, verify == "sha256")  # (background: see BackgroundCheck)
        if problem is None or on_damaged == "read":
            good.append((str(path), s["count"]))
        if problem is None:
            continue
        if on_damaged in ("skip", "read"):
            damaged.append((s, problem))
        else:
            raise UserError(f"shard {path} {problem}: it was replaced or damaged after `make shards`; rebuild the "
                              f"set (`make verify NAME={d.name}` lists every damaged shard) or set "
                              f"data.on_damaged_shard=skip to train without it")
    if damaged:
        lost = sum(s["count"] for s, _ in damaged)
        total = sum(s["count"] for s in manifest["splits"][split]["shards"])
        log.warning("data.on_damaged_shard=%s: %s %d damaged %s shard(s) of %d (%d of %d samples): %s", on_damaged,
                    "leaving out" if on_damaged == "skip" else "reading what is left of", len(damaged), split,
                    len(manifest["splits"][split]["shards"]), lost, total,
                    "; ".join(f"{d / s['file']} {problem}" for s, problem in damaged))
    return tuple(good)


def shard_damage(path: Path, shard: dict, sha256: bool) -> str | None:
    """None when the shard file matches its manifest entry (size; and sha256 when asked), else a phrase."""
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if "bytes" in shard and size != int(shard["bytes"]):
        return f"has {size} bytes, the manifest says {shard['bytes']}"
    if sha256 and "sha256" in shard:
        key = (str(path), size, path.stat().st_mtime_ns)
        if key not in _HASHED:  # once per process and file version: validation asks again at every eval
            _HASHED[key] = durable.sha256_file(path)
        if _HASHED[key] != shard["sha256"]:
            return "does not match the sha256 the manifest lists for it"
    return None


_HASHED: dict[tuple[str, int, int], str] = {}


class BackgroundCheck:
    """data.verify_shards=background: re-hash shards in a daemon thread while training runs (hashlib and
    file reads release the GIL). `raise_if_damaged()`, called once a batch, stops the run at the first
    mismatch found."""

    def __init__(self, shards: list[tuple[Path, dict]]):
        self.problem: str | None = None
        self.thread = threading.Thread(target=self._run, args=(shards,), name="shard-sha256", daemon=True)
        self.thread.start()

    def _run(self, shards: list[tuple[Path, dict]]) -> None:
        for path, entry in shards:
            problem = shard_damage(path, entry, sha256=True)
            if problem is not None:
                self.problem = f"shard {path} {problem}"
                return

    def raise_if_damaged(self) -> None:
        if self.problem is not None:
            raise UserError(f"{self.problem} (found by data.verify_shards=background while training): it was "
                              f"replaced or damaged after `make shards`; rebuild the set, or restart with "
                              f"data.verify_shards=sha256 data.on_damaged_shard=skip to train without it")
