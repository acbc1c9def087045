"""Image folder -> verified WebDataset shards + manifest.json.

    python -m pipeline.shards data/flowers --name flowers --size 128      # (make shards)
    python -m pipeline.shards verify shards/flowers                       # (make verify NAME=flowers)

SRC holds one subfolder per class (data/flowers/daisy/..., the Kaggle layout) or is a flat folder
of images (no labels). Every image is decoded once (EXIF orientation, correct RGB whatever the
mode; a JPEG at the smallest DCT scale that still covers SIZE), its central square resized once to
SIZE x SIZE (antialiased bicubic, pipeline.images.resize_center_crop) and encoded once (jpg by
default; png, webp or raw npy with --format).

The sample key is a hash of the image's content that does not depend on SIZE or on any option:
- a JPEG: sha256 of the file without its metadata segments (APP0/APP1 EXIF-XMP/APP13/... and
  comments; the quantisation and Huffman tables, the ICC profile, the Adobe colour marker and the
  entropy-coded data are kept) and of its EXIF orientation: the same coefficients shown the same
  way. So a copy with its metadata stripped or edited is the same image; no decode is needed for
  the key, and it does not change with the JPEG decoder's version;
- any other format: sha256 of the decoded full-size RGB pixels (and their size), so the same
  picture saved as PNG and as BMP is the same image.
The key decides the split (so adding files never moves an image between train and val, whatever
--size) and finds duplicates, which are stored once (the first in processing order).

Workers do the decoding, hashing, resizing and encoding, and hand back each sample's tar members
ready-made; the main process only de-duplicates, writes the bytes and hashes them. On a SLURM
array each task writes the same per-file results for a contiguous part of the file list to a
staging folder and one merge job writes the shards from them: byte-identical to one process
(`--parts N` with `--part I` or `--merge`; slurm/shards.sbatch).

Every tar member gets fixed metadata (mtime 0, uid/gid 0, mode 0444) and samples are written in
a fixed order, so the same inputs and options give byte-identical shards. A run writes into a
hidden staging folder (shards/.NAME.partial), renames each shard when it is complete, writes the
manifest last (pipeline.durable) and only then swaps the folder into place: an interrupted run
leaves the previous complete set untouched and nothing new that looks complete.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import PIL
from tqdm import tqdm

from pipeline import arrays, durable
from pipeline.errors import UserError
from pipeline.images import (IMAGE_EXTENSIONS, STORED_FORMATS, describe_error, encode_image, load_rgb_reduced,
                             resize_center_crop)

MANIFEST_FORMAT = 1  # manifest.json's format; pipeline.data.manifest reads only this one
KEY_VERSION = 2  # 1: pixel hash of every format; 2: JPEGs keyed on their bytes (module docstring)
KEY_HEX_CHARS = 20  # 80 bits of the pixel hash: a collision among 10^7 images has odds ~1e-10
SPLITS = ("train", "val")
SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")
# Directories that are never class folders: macOS zip debris and version-control/hidden folders.
IGNORED_DIRS = {"__MACOSX"}
FLOWERS_URL = "https://www.kaggle.com/datasets/alxmamaev/flowers-recognition"


class ShardsError(UserError):
    """A user mistake (bad SRC, bad option, foreign files in the output). One sentence; exit 2."""


@dataclass(frozen=True)
class _Task:
    path: str  # absolute, for opening
    rel: str  # relative to SRC, POSIX separators: what the manifest and the json member record
    label: int  # class index, -1 in a flat folder
    class_name: str | None  # None in a flat folder
    size: int
    image_format: str
    quality: int
    min_side: int
    spatial_dims: int = 2  # 1 or 3: array mode (pipeline.arrays): .npy/.wav files, not images
    channels_last: bool = False  # array mode: the last axis of an array with spatial_dims + 1 axes is C
    sample_shape: tuple[int, ...] = ()  # array mode: the [C, *spatial] every sample must have


# ------------------------------------------------------------------------------------------------
# Source scanning
# ------------------------------------------------------------------------------------------------


def _source_hint(src: Path) -> str:
    if src.name == "flowers":
        return (f"download the Kaggle data set alxmamaev/flowers-recognition ({FLOWERS_URL}) and "
                f"unpack it so that {src}/daisy/ exists, or run `make demo-data` for offline demo images")
    return ("pass a folder of images (one subfolder per class, or a flat folder), "
            "or run `make demo-data` for offline demo images")


def scan_source(src: Path, extensions: frozenset[str] = IMAGE_EXTENSIONS,
                what: str = "image") -> tuple[list[str], list[tuple[str, str, int]], list[dict]]:
    """-> (classes, [(abs path, rel path, label)], skipped). Files whose extension is not an image
    one (array mode: not in `extensions`) are ignored silently; hidden files and folders are ignored."""
    if not src.exists():
        raise ShardsError(f"source folder {src} does not exist; {_source_hint(src)}")
    if not src.is_dir():
        raise ShardsError(f"source {src} is not a folder; {_source_hint(src)}")
    found: list[tuple[str, str]] = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in IGNORED_DIRS)
        # The relative folder once per folder (os.path.relpath per file cost ~20 us, 2 % of sharding a file)
        prefix = "" if root == str(src) else Path(os.path.relpath(root, src)).as_posix() + "/"
        for f in sorted(files):
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in extensions:
                continue
            found.append((os.path.join(root, f), prefix + f))
    if not found:
        exts = " ".join(sorted(extensions))
        hint = _source_hint(src) if what == "image" else (
            "pass a folder of arrays (one subfolder per class, or a flat folder), or run `make demo-signals` / "
            "`make demo-volumes` for generated ones")
        raise ShardsError(f"source folder {src} holds no {what} files ({exts}); {hint}")
    classes = sorted({rel.split("/", 1)[0] for _, rel in found if "/" in rel})
    index = {c: i for i, c in enumerate(classes)}
    items, skipped = [], []
    for path, rel in found:
        if classes and "/" not in rel:
            skipped.append({"path": rel, "reason": "not inside a class folder (SRC has class subfolders)"})
        else:
            items.append((path, rel, index[rel.split("/", 1)[0]] if classes else -1))
    return classes, items, skipped


# ------------------------------------------------------------------------------------------------
# Per-image work (runs in worker processes)
# ------------------------------------------------------------------------------------------------


# JPEG markers whose segments are metadata, left out of a JPEG's key: APP0-APP15 except APP2 (ICC
# profile) and APP14 (Adobe: the colour transform), and COM. Everything else defines the pixels.
_JPEG_METADATA = frozenset(range(0xE0, 0xF0)) - {0xE2, 0xEE} | {0xFE}


def jpeg_key(data: bytes, orientation: int) -> str | None:
    """sha256 of a JPEG's pixel-defining bytes and its EXIF orientation (see the module docstring);
    None when the marker structure cannot be followed."""
    if data[:2] != b"\xff\xd8":
        return None
    h = hashlib.sha256(b"jpeg:%d:" % orientation)
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: from here on entropy-coded data (and later tables, scans)
            h.update(data[i:])
            return h.hexdigest()
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker not in _JPEG_METADATA:
            h.update(data[i:end])
        i = end
    return None


def _content_key(data: bytes, loaded) -> str:
    if loaded.format == "JPEG":
        key = jpeg_key(data, loaded.orientation)
        if key is not None:
            return key
        return hashlib.sha256(b"file:" + data).hexdigest()  # a JPEG Pillow reads but we cannot parse
    img = loaded.image  # decoded at full size: no reduced decoding outside JPEG
    return hashlib.sha256(b"%dx%d:" % img.size + img.tobytes()).hexdigest()


# USTAR header fields of a member with fixed metadata. After name, mode, uid, gid, size, mtime and the
# checksum, every regular file's header is the same: type "0", no link, "ustar\0" "00", empty owner
# names, empty device numbers (what tarfile writes for a regular file), no prefix.
_MODE_UID_GID, _MTIME = b"0000444\0" + b"0000000\0" * 2, b"00000000000\0"
_HEADER_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(64) + bytes(16) + bytes(155 + 12)
_HEADER_TAIL_SUM = sum(_HEADER_TAIL) + 8 * ord(" ")  # the checksum counts its own field as spaces


def _tar_member(name: str, data: bytes) -> bytes:
    """One tar member as bytes: the header tarfile writes for it (USTAR, fixed metadata: mode 0444,
    uid/gid 0, mtime 0) + padded data. Built directly for the short ASCII names the writer uses
    (tarfile's pure-Python header costs ~35 us, a third of everything but decoding and encoding);
    test_shards checks the bytes against tarfile's."""
    if len(name) > 100 or len(data) >= 8**11 or not name.isascii():  # tarfile splits long names into a prefix
        header = _tarinfo(name, len(data)).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    else:
        head = name.encode().ljust(100, b"\0") + _MODE_UID_GID + b"%011o\0" % len(data) + _MTIME
        header = head + b"%06o\0 " % (sum(head) + _HEADER_TAIL_SUM) + _HEADER_TAIL
    return header + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _process(task: _Task) -> dict:
    """Read, decode, key, resize, encode one file and build its tar members. Runs in the workers.
    -> {"key", "width", "height", "blob": the sample's tar members} or, for a bad file, {"error": reason};
    never raises for a bad file."""
    if task.spatial_dims != 2:
        return _process_array(task)
    try:
        with open(task.path, "rb") as f:
            data = f.read()
        if not data:
            return {"error": "empty file (0 bytes)"}
        loaded = load_rgb_reduced(io.BytesIO(data), task.size)
        w, h = loaded.width, loaded.height
        if min(w, h) < task.min_side:
            return {"error": f"too small ({w}x{h} px; the shorter side must be at least {task.min_side} px, "
                             f"see --min-side)"}
        digest = _content_key(data, loaded)
        arr = resize_center_crop(loaded.image, task.size)
        encoded = encode_image(arr, task.image_format, task.quality)
    except Exception as e:  # a bad file must never stop the run
        return {"error": describe_error(e)}
    key = digest[:KEY_HEX_CHARS]
    meta = {"path": task.rel, "class": task.class_name, "width": w, "height": h}
    members = [_tar_member(f"{key}.{task.image_format}", encoded)]
    if task.label >= 0:
        members.append(_tar_member(f"{key}.cls", b"%d" % task.label))
    members.append(_tar_member(f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()))
    return {"key": digest, "width": w, "height": h, "blob": b"".join(members)}


def _process_array(task: _Task) -> dict:
    """Array mode: read (never unpickling), check and convert one .npy/.wav file to a float32 [C, *spatial]
    sample stored as .npy in its original units; -> like _process, plus its "low" and "high" values."""
    try:
        arr, digest = arrays.load_array(task.path)
        sample = arrays.to_sample(arr, task.spatial_dims, task.channels_last, wav=task.path.lower().endswith(".wav"))
    except (ValueError, OSError) as e:
        return {"error": str(e) if isinstance(e, ValueError) else describe_error(e)}
    if sample.shape != task.sample_shape:
        return {"error": f"shape {list(sample.shape)} as [C, *spatial] differs from the data set's "
                         f"{list(task.sample_shape)} (every sample must have the same)"}
    key = digest[:KEY_HEX_CHARS]
    meta = {"path": task.rel, "class": task.class_name, "shape": list(sample.shape), "dtype": str(arr.dtype)}
    members = [_tar_member(f"{key}.npy", arrays.encode_npy(sample))]
    if task.label >= 0:
        members.append(_tar_member(f"{key}.cls", b"%d" % task.label))
    members.append(_tar_member(f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()))
    return {"key": digest, "width": sample.shape[-1], "height": sample.shape[-2] if sample.ndim > 2 else 1,
            "blob": b"".join(members), "low": float(sample.min()), "high": float(sample.max())}


def is_val(digest: str, val_fraction: float) -> bool:
    """The split is a pure function of the content hash: adding files never moves an image."""
    return int(digest[:16], 16) < val_fraction * 2**64


# ------------------------------------------------------------------------------------------------
# Tar writing
# ------------------------------------------------------------------------------------------------


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Everything fixed: tarfile would otherwise be fine, but webdataset's TarWriter stamps
    # time.time() as mtime unless given one, which breaks byte-identical re-runs.
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class _SplitWriter:
    """Writes one split's samples (their tar members as bytes, from _process) into <split>-000000.tar,
    ... capped by count and bytes; hashes what it writes. Each shard is written as <file>.tmp and
    renamed when closed. The bytes are what tarfile writes for the same members (w| mode, USTAR)."""

    def __init__(self, folder: Path, split: str, max_samples: int, max_bytes: int):
        self.folder, self.split = folder, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict] = []
        self.raw = None

    def write(self, blob: bytes) -> None:
        if self.raw is not None and (self.count >= self.max_samples or self.nbytes + len(blob) > self.max_bytes):
            self.close()
        if self.raw is None:
            self._open()
        self._put(blob)
        self.count += 1

    def _put(self, data: bytes) -> None:
        self.raw.write(data)
        self.sha.update(data)
        self.nbytes += len(data)

    def _open(self) -> None:
        self.file_name = f"{self.split}-{len(self.shards):06d}.tar"
        path = self.folder / self.file_name
        self.out = durable.Writer(path, tmp=path.with_name(path.name + ".tmp"), buffering=1 << 20)
        self.raw = self.out.file
        self.sha, self.count, self.nbytes = hashlib.sha256(), 0, 0

    def close(self) -> None:
        if self.raw is None:
            return
        members = self.nbytes
        # End of archive as tarfile writes it: two zero blocks, then zeros up to the record size.
        end = members + 2 * tarfile.BLOCKSIZE
        self._put(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self.out.commit()
        self.shards.append({"file": self.file_name, "count": self.count, "bytes": self.nbytes,
                            "sha256": self.sha.hexdigest()})
        self.raw = None

    def abort(self) -> None:
        if self.raw is not None:
            self.out.abort()
            self.raw = None


# ------------------------------------------------------------------------------------------------
# Output folder: staging, locking and the final swap
# ------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    """A manifest or a part's results, durably, under <name>.tmp while written (which _is_ours knows)."""
    durable.write_json(path, obj, tmp=path.with_name(path.name + ".tmp"), end="\n", indent=1, ensure_ascii=False)


def _is_ours(name: str) -> bool:
    return bool(SHARD_RE.match(name)) or name in ("manifest.json",) or name.endswith(".tar.tmp") \
        or name == "manifest.json.tmp"


class _OutputFolder:
    """shards/NAME written via shards/.NAME.partial, swapped in only when complete; the previous set
    is parked at shards/.NAME.old during the two renames and removed afterwards."""

    def __init__(self, out_dir: Path, name: str):
        if not name or "/" in name or os.sep in name or name.startswith(".") or name in ("..",):
            raise ShardsError(f"--name {name!r} must be a plain folder name such as flowers")
        self.root = out_dir
        self.final = out_dir / name
        self.stage = out_dir / f".{name}.partial"
        self.old = out_dir / f".{name}.old"
        self.lock_path = out_dir / f".{name}.lock"

    def __enter__(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.lock_path, "w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock.close()
            raise ShardsError(f"another run is writing {self.final} right now; wait for it to finish") from None
        try:
            self._recover()
            if self.final.exists():
                foreign = sorted(p.name for p in self.final.iterdir() if not _is_ours(p.name))
                if foreign:
                    raise ShardsError(f"{self.final} exists and holds files that are not shards ({foreign[0]}, ...); "
                                      f"choose another --name or move them away")
            if self.stage.exists():
                shutil.rmtree(self.stage)  # the leftovers of an interrupted run; nothing reads them
            self.stage.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self.stage

    def _recover(self) -> None:
        """Finish or undo a swap that an earlier run was killed in the middle of."""
        if not self.old.exists():
            return
        if not self.final.exists():
            # Killed between the two renames: restore the old set. Not a durability step (if this rename is
            # lost in a crash, the next start finds the same state and does it again), so a plain rename.
            os.rename(self.old, self.final)
        elif (self.final / "manifest.json").is_file():
            shutil.rmtree(self.old)  # killed after the swap, before the clean-up
        else:
            raise ShardsError(f"{self.final} has no manifest.json but a previous set is parked at {self.old}; "
                              f"keep the one you want and remove the other")

    def commit(self) -> None:
        """Swap the complete staging folder into place, the previous set parked at .NAME.old during the
        two renames (_recover finishes or undoes a swap a kill interrupted)."""
        durable.replace_folder(self.stage, self.final, parked=self.old)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.stage.exists():
            shutil.rmtree(self.stage, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        self.lock.close()


# ------------------------------------------------------------------------------------------------
# The writer
# ------------------------------------------------------------------------------------------------


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects Slurm/cgroup CPU binding
    except AttributeError:
        return os.cpu_count() or 1


def _results(tasks: list[_Task], workers: int) -> Iterable[dict]:
    """Results in task order. One worker runs in this process (the honest single-core figure).
    Several: forked from one fork server that imported this module and torch once (~1.5 s), where
    spawn would import them again in every worker and fork would copy a parent with threads
    (numpy's OpenBLAS pool, the caller's torch)."""
    if workers <= 1 or len(tasks) < 2:
        yield from map(_process, tasks)
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.shards", "torch.nn.functional"])
    # Chunks of up to 128 tasks: the pool costs the main process ~200 us per image at 8 a chunk, ~90 at
    # 32, ~70 at 128 (its CPU is taken from the workers); 8 chunks per worker keep the ends even.
    chunk = max(1, min(128, len(tasks) // (workers * 8)))
    with ctx.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(_process, tasks, chunksize=chunk)


def _check_options(size, val_fraction, image_format, quality, max_samples, max_bytes, min_side) -> str:
    fmt = image_format.lower().lstrip(".")
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in STORED_FORMATS:
        raise ShardsError(f"--format {image_format!r} must be one of {', '.join(STORED_FORMATS)}")
    if size < 1:
        raise ShardsError(f"--size must be at least 1 px, got {size}")
    if not 0 <= val_fraction < 1:
        raise ShardsError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not 1 <= quality <= 100:
        raise ShardsError(f"--quality must be in 1..100, got {quality}")
    if max_samples < 1 or max_bytes < 1:
        raise ShardsError("--max-samples-per-shard and --max-bytes-per-shard must be at least 1")
    if min_side < 0:
        raise ShardsError(f"--min-side must be 0 or more, got {min_side}")
    return fmt


@dataclass(frozen=True)
class _Plan:
    """What every process of one sharding (one process, or each array task and the merge) derives
    alike from SRC and the options: the classes, the files in processing order, the skipped ones."""

    src: Path
    name: str
    fmt: str
    options: dict  # as the manifest records them
    classes: list[str]
    tasks: list[_Task]
    skipped: list[dict]  # found while scanning (not inside a class folder)
    sample_shape: tuple[int, ...] = ()  # array mode: [C, *spatial] of every sample (images: empty)

    def fingerprint(self) -> str:
        """sha256 of the file list (paths, labels, sizes, modification times), the options and the
        versions of the libraries that make the stored bytes: an array task's results are only merged
        with those of tasks that saw the same and would have written the same."""
        h = hashlib.sha256(json.dumps([self.options, self.classes, self.skipped, library_versions()],
                                      sort_keys=True).encode())
        for task in self.tasks:
            st = os.stat(task.path)
            h.update(b"%s\0%d\0%d\0%d\n" % (task.rel.encode("utf-8", "surrogateescape"), task.label,
                                              st.st_size, st.st_mtime_ns))
        return h.hexdigest()


def library_versions() -> dict[str, str]:
    """The libraries whose version decides the stored bytes: Pillow (decoding, JPEG/PNG/WebP encoding),
    numpy, torch (the resize). Recorded in the manifest; a SLURM merge refuses parts made with others."""
    return {"pillow": PIL.__version__, "numpy": np.__version__, "torch": importlib.metadata.version("torch")}


def _plan(src, name, size, val_fraction, image_format, quality, max_samples_per_shard, max_bytes_per_shard,
          min_side, spatial_dims: int = 2, channels_last: bool = False,
          value_range: tuple[float, float] | None = None) -> _Plan:
    src = Path(src)
    fmt = _check_options(size, val_fraction, image_format, quality, max_samples_per_shard,
                         max_bytes_per_shard, min_side)
    if spatial_dims != 2:
        return _array_plan(src, name, val_fraction, max_samples_per_shard, max_bytes_per_shard, spatial_dims,
                           channels_last, value_range)
    classes, items, skipped = scan_source(src)
    # Process in an order fixed by a hash of the relative path: deterministic, and it mixes the
    # classes inside every shard, which a streaming reader's shuffle buffer needs.
    items.sort(key=lambda it: hashlib.sha256(it[1].encode("utf-8")).digest())
    tasks = [_Task(path, rel, label, classes[label] if classes else None, size, fmt, quality, min_side)
             for path, rel, label in items]
    options = {"src": str(src), "size": size, "val_fraction": val_fraction, "image_format": fmt,
               "quality": quality, "max_samples_per_shard": max_samples_per_shard,
               "max_bytes_per_shard": max_bytes_per_shard, "min_side": min_side, "key_version": KEY_VERSION}
    return _Plan(src, name or src.resolve().name, fmt, options, classes, tasks, skipped)


def _array_plan(src: Path, name, val_fraction, max_samples_per_shard, max_bytes_per_shard, spatial_dims: int,
                channels_last: bool, value_range: tuple[float, float] | None) -> _Plan:
    """Array mode (--spatial-dims 1|3): the files, and the one [C, *spatial] shape they must share: the most
    common one among the files' headers (ties: the first in processing order); the others are skipped."""
    if spatial_dims not in (1, 3):
        raise ShardsError(f"--spatial-dims must be 1 (signals), 2 (images) or 3 (volumes), got {spatial_dims}")
    if value_range is not None and not value_range[0] < value_range[1]:
        raise ShardsError(f"--range {value_range[0]} {value_range[1]} must give LOW below HIGH")
    what = "array"
    classes, items, skipped = scan_source(src, arrays.ARRAY_EXTENSIONS[spatial_dims], what)
    items.sort(key=lambda it: hashlib.sha256(it[1].encode("utf-8")).digest())
    shapes = [arrays.header_shape(path, spatial_dims, channels_last) for path, _, _ in items]
    counts: dict[tuple[int, ...], int] = {}
    first: dict[tuple[int, ...], int] = {}
    for i, shape in enumerate(shapes):
        if shape is not None and 0 not in shape:
            counts[shape] = counts.get(shape, 0) + 1
            first.setdefault(shape, i)
    if not counts:
        raise ShardsError(f"none of the {len(items)} array files in {src} has a readable header with "
                          f"{spatial_dims} or {spatial_dims + 1} axes; see pipeline/arrays.py for what is read")
    shape = max(counts, key=lambda s: (counts[s], -first[s]))
    if spatial_dims == 3 and len(set(shape[1:])) > 1:
        raise ShardsError(f"the volumes in {src} are {' x '.join(map(str, shape[1:]))} voxels, but the models need "
                          f"cubes (D = H = W); crop or pad them to a cube first")
    tasks = [_Task(path, rel, label, classes[label] if classes else None, shape[-1], "npy", 0, 0,
                   spatial_dims, channels_last, shape) for path, rel, label in items]
    options = {"src": str(src), "spatial_dims": spatial_dims, "channels_last": channels_last,
               "range": list(value_range) if value_range else None, "val_fraction": val_fraction,
               "max_samples_per_shard": max_samples_per_shard, "max_bytes_per_shard": max_bytes_per_shard,
               "key_version": KEY_VERSION}
    return _Plan(src, name or src.resolve().name, "npy", options, classes, tasks, skipped, shape)


def _array_fields(plan: _Plan, low: float, high: float) -> dict:
    """The manifest fields of an array set: what the readers, the model and the sample tools need."""
    given = plan.options["range"]
    if given:
        low, high, source = float(given[0]), float(given[1]), "given"
    else:
        source = "data"
        high = high if high > low else low + 1.0  # constant data: any scale maps it to one value
    return {"kind": "array", "spatial_dims": plan.options["spatial_dims"], "sample_shape": list(plan.sample_shape),
            "dtype": "float32",
            "normalization": {"low": low, "high": high, "source": source,
                              "how": "x -> (x - low) / (high - low), clipped to [0, 1], then to the model's range"}}


def _write_set(plan: _Plan, out_dir: str | Path, results: Iterable[dict], progress: bool, log, t0: float,
               how: str) -> dict:
    """The main process's part: results (in task order) -> de-duplicated, split, written shards and
    manifest.json, swapped into out_dir/name. The same for one process and for a merge of parts."""
    src, name, fmt, classes, tasks = plan.src, plan.name, plan.fmt, plan.classes, plan.tasks
    o = plan.options
    skipped = list(plan.skipped)
    duplicates: list[dict] = []
    per_class = {s: {c: 0 for c in classes} for s in SPLITS}
    seen: dict[str, str] = {}  # full content key -> rel path of the stored copy
    folder = _OutputFolder(Path(out_dir), name)
    is_array, low, high = bool(plan.sample_shape), float("inf"), float("-inf")
    noun = "samples" if is_array else "images"
    with folder as stage:
        writers = {s: _SplitWriter(stage, s, o["max_samples_per_shard"], o["max_bytes_per_shard"]) for s in SPLITS}
        bar = tqdm(total=len(tasks), unit="img", desc=f"shards/{name}", disable=not progress,
                   dynamic_ncols=True, file=sys.stderr)
        try:
            for task, res in zip(tasks, results, strict=True):
                bar.update(1)
                if "error" in res:
                    skipped.append({"path": task.rel, "reason": res["error"]})
                    continue
                digest = res["key"]
                if digest in seen:
                    duplicates.append({"path": task.rel, "same_as": seen[digest]})
                    continue
                seen[digest] = task.rel
                if is_array:  # the data set's range over every stored sample (the normalisation)
                    low, high = min(low, res["low"]), max(high, res["high"])
                split = "val" if is_val(digest, o["val_fraction"]) else "train"
                if classes:
                    per_class[split][classes[task.label]] += 1
                writers[split].write(res["blob"])
            for w in writers.values():
                w.close()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        finally:
            bar.close()
        skipped.sort(key=lambda s: s["path"])
        duplicates.sort(key=lambda d: d["path"])
        written = sum(sum(sh["count"] for sh in w.shards) for w in writers.values())
        if written == 0:
            for s in skipped[:20]:
                log(f"skipped {s['path']}: {s['reason']}")
            raise ShardsError(f"none of the {len(tasks)} {'array' if is_array else 'image'} files in {src} could be "
                              f"{'read' if is_array else 'decoded'} (reasons above); {_source_hint(src)}")
        manifest = {
            "format": MANIFEST_FORMAT, "name": name, "size": plan.sample_shape[-1] if is_array else o["size"],
            "image_format": fmt, "classes": classes,
            "splits": {s: {"count": sum(sh["count"] for sh in writers[s].shards), "per_class": per_class[s],
                           "shards": writers[s].shards} for s in SPLITS},
            "skipped": skipped, "duplicates": duplicates, "options": o,
            "versions": library_versions(),
        }
        if is_array:  # images keep the manifest they always had (readers default to 2-D images)
            manifest.update(_array_fields(plan, low, high))
        _write_json(stage / "manifest.json", manifest)  # last: its presence means complete
        folder.commit()

    seconds = time.perf_counter() - t0
    for s in skipped[:20]:
        log(f"skipped {s['path']}: {s['reason']}")
    if len(skipped) > 20:
        log(f"... and {len(skipped) - 20} more skipped files, listed in {folder.final / 'manifest.json'}")
    if len(classes) == 1:
        log(f"note: {src} has a single class folder {classes[0]!r}; if it only wraps the class folders, "
            f"pass {src / classes[0]} as SRC")
    n_shards = sum(len(w.shards) for w in writers.values())
    log(f"{folder.final}: wrote {written} {noun} (train {manifest['splits']['train']['count']}, "
        f"val {manifest['splits']['val']['count']}) in {n_shards} shards; skipped {len(skipped)}, "
        f"duplicates {len(duplicates)}; {seconds:.1f} s ({len(tasks) / max(seconds, 1e-9):.0f} {noun}/s, {how})")
    if is_array:
        n = manifest["normalization"]
        log(f"samples are {manifest['sample_shape']} ([C, *spatial]); values {n['low']:g}..{n['high']:g} "
            f"({'--range' if n['source'] == 'given' else 'the data set'}) map to the model's range")
    return manifest


def write_shards(src: str | Path, out_dir: str | Path = "shards", name: str | None = None, size: int = 128, *,
                 val_fraction: float = 0.1, image_format: str = "jpg", quality: int = 95,
                 workers: int | None = None, max_samples_per_shard: int = 1000,
                 max_bytes_per_shard: int = 1_000_000_000, min_side: int = 16, progress: bool = True,
                 log: Callable[[str], None] = print, spatial_dims: int = 2, channels_last: bool = False,
                 value_range: tuple[float, float] | None = None) -> dict:
    """Shard the image folder `src` into out_dir/name (name defaults to src's folder name).
    spatial_dims 1 or 3: a folder of .npy (and, 1-D, .wav) arrays instead (pipeline.arrays; size,
    image_format, quality and min_side do not apply; value_range fixes the normalisation).
    Returns the manifest. Raises ShardsError (one sentence) on a user mistake."""
    t0 = time.perf_counter()
    plan = _plan(src, name, size, val_fraction, image_format, quality, max_samples_per_shard, max_bytes_per_shard,
                 min_side, spatial_dims, channels_last, value_range)
    workers = default_workers() if not workers or workers < 1 else workers
    return _write_set(plan, out_dir, _results(plan.tasks, workers), progress, log, t0,
                      f"{workers} worker{'s' if workers > 1 else ''}")


# ------------------------------------------------------------------------------------------------
# On a SLURM array: parts written by the array tasks, merged by one job
# ------------------------------------------------------------------------------------------------


def _part_range(n: int, part: int, parts: int) -> tuple[int, int]:
    """Tasks [lo, hi) of part `part` of `parts`: contiguous, so the parts in order are the file list."""
    return part * n // parts, (part + 1) * n // parts


def _parts_dir(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f".{name}.parts"


def _part_paths(out_dir, name: str, part: int, parts: int) -> tuple[Path, Path]:
    stem = _parts_dir(out_dir, name) / f"part-{part:06d}-of-{parts:06d}"
    return stem.with_suffix(".json"), stem.with_suffix(".bin")


def _check_parts(part: int | None, parts: int) -> None:
    if parts < 1:
        raise ShardsError(f"--parts must be at least 1, got {parts}")
    if part is not None and not 0 <= part < parts:
        raise ShardsError(f"--part {part} is not in 0..{parts - 1} (--parts {parts})")


def write_part(src: str | Path, out_dir: str | Path = "shards", name: str | None = None, size: int = 128, *,
               part: int, parts: int, val_fraction: float = 0.1, image_format: str = "jpg", quality: int = 95,
               workers: int | None = None, max_samples_per_shard: int = 1000,
               max_bytes_per_shard: int = 1_000_000_000, min_side: int = 16, progress: bool = True,
               log: Callable[[str], None] = print) -> Path:
    """One array task: process part `part` of `parts` of the file list into out_dir/.name.parts/
    (part-I-of-N.bin: the samples' tar members; part-I-of-N.json, written last: the results and the
    fingerprint of the file list and options). Nothing here looks like a shard set. -> the json."""
    t0 = time.perf_counter()
    _check_parts(part, parts)
    plan = _plan(src, name, size, val_fraction, image_format, quality, max_samples_per_shard, max_bytes_per_shard,
                 min_side)
    workers = default_workers() if not workers or workers < 1 else workers
    lo, hi = _part_range(len(plan.tasks), part, parts)
    meta_path, bin_path = _part_paths(out_dir, plan.name, part, parts)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # a task run again: its old part stops counting before anything changes
    records = []
    with durable.Writer(bin_path, tmp=bin_path.with_name(bin_path.name + ".tmp"), buffering=1 << 20) as w:
        results = _results(plan.tasks[lo:hi], workers)
        for res in tqdm(results, total=hi - lo, unit="img", desc=f"part {part}/{parts}", disable=not progress,
                        dynamic_ncols=True, file=sys.stderr):
            if "error" in res:
                records.append({"error": res["error"]})
            else:
                records.append({"key": res["key"], "width": res["width"], "height": res["height"],
                                "bytes": len(res["blob"])})
                w.file.write(res["blob"])
    _write_json(meta_path, {"part": part, "parts": parts, "first": lo, "stop": hi,
                                   "fingerprint": plan.fingerprint(), "options": plan.options,
                                   "bin_bytes": bin_path.stat().st_size, "results": records})
    log(f"{meta_path}: files {lo}..{hi - 1} of {len(plan.tasks)} ({hi - lo - sum('error' in r for r in records)} "
        f"good) in {time.perf_counter() - t0:.1f} s, {workers} worker{'s' if workers > 1 else ''}")
    return meta_path


def submit_slurm(job_args: list[str], parts: int, sbatch_args: list[str]) -> tuple[str, str]:
    """sbatch slurm/shards.sbatch as an array of `parts` tasks, then as the merge job that starts only
    when every task succeeded (--dependency=afterok; a failed task cancels it). -> (array, merge) ids."""
    script = str(Path(__file__).resolve().parents[1] / "slurm" / "shards.sbatch")
    if not shutil.which("sbatch"):
        raise ShardsError("--slurm needs sbatch on the PATH; run it on a SLURM login node")

    def sbatch(*flags: str) -> str:
        r = subprocess.run(["sbatch", "--parsable", *flags, *sbatch_args, script, *job_args],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ShardsError(f"sbatch failed ({r.stderr.strip() or r.returncode}); check the partition and "
                              f"account options given after --")
        return r.stdout.strip().split(";")[0]

    array = sbatch(f"--array=0-{parts - 1}")
    merge = sbatch(f"--dependency=afterok:{array}", "--kill-on-invalid-dep=yes")
    print(f"submitted array job {array} ({parts} tasks) and merge job {merge} (starts when all tasks succeeded)")
    return array, merge


def _part_results(metas: list[dict], bins: list[Path]) -> Iterable[dict]:
    for meta, bin_path in zip(metas, bins):
        with open(bin_path, "rb", buffering=1 << 20) as f:
            for r in meta["results"]:
                if "error" in r:
                    yield r
                    continue
                blob = f.read(r["bytes"])
                if len(blob) != r["bytes"]:
                    raise ShardsError(f"{bin_path} is shorter than its part's record says; resubmit that task")
                yield {"key": r["key"], "width": r["width"], "height": r["height"], "blob": blob}


def merge_parts(src: str | Path, out_dir: str | Path = "shards", name: str | None = None, size: int = 128, *,
                parts: int, val_fraction: float = 0.1, image_format: str = "jpg", quality: int = 95,
                max_samples_per_shard: int = 1000, max_bytes_per_shard: int = 1_000_000_000, min_side: int = 16,
                progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """The merge job: the parts' results, in order, through the same writer as one process: the shard
    set is byte-identical to write_shards' on the same folder and options. Refuses (ShardsError, one
    sentence naming the parts to resubmit) while any part is missing or was made from another file
    list or options. Removes the parts when the set is in place. -> the manifest."""
    t0 = time.perf_counter()
    _check_parts(None, parts)
    plan = _plan(src, name, size, val_fraction, image_format, quality, max_samples_per_shard, max_bytes_per_shard,
                 min_side)
    fingerprint = plan.fingerprint()
    metas, bins, missing, foreign = [], [], [], []
    for part in range(parts):
        meta_path, bin_path = _part_paths(out_dir, plan.name, part, parts)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            missing.append(part)
            continue
        lo, hi = _part_range(len(plan.tasks), part, parts)
        if (meta.get("fingerprint") != fingerprint or (meta.get("first"), meta.get("stop")) != (lo, hi)
                or len(meta.get("results", ())) != hi - lo):
            foreign.append(part)
        elif not bin_path.is_file() or bin_path.stat().st_size != meta.get("bin_bytes"):
            missing.append(part)
        metas.append(meta)
        bins.append(bin_path)
    if missing or foreign:
        listed = ",".join(map(str, sorted(missing + foreign)))
        why = (f"part{'s' if len(missing) > 1 else ''} {','.join(map(str, missing))} of {parts} "
               f"{'are' if len(missing) > 1 else 'is'} missing or incomplete" if missing else "")
        if foreign:
            why += ("; " if why else "") + (f"part{'s' if len(foreign) > 1 else ''} {','.join(map(str, foreign))} "
                                            f"{'were' if len(foreign) > 1 else 'was'} made from another file list, "
                                            f"other options or other library versions")
        raise ShardsError(f"cannot merge {_parts_dir(out_dir, plan.name)}: {why}; resubmit those tasks with the same "
                          f"arguments (sbatch --array={listed} slurm/shards.sbatch ...) and then the merge")
    manifest = _write_set(plan, out_dir, _part_results(metas, bins), progress, log, t0, f"merged {parts} parts")
    shutil.rmtree(_parts_dir(out_dir, plan.name), ignore_errors=True)
    return manifest


# ------------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------------


def _read_samples(path: Path) -> list[tuple[str, set[str]]]:
    """[(key, {extensions})] in tar order. Raises tarfile.TarError/OSError on a broken tar."""
    samples: list[tuple[str, set[str]]] = []
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, set()))
            samples[-1][1].add(ext)
    return samples


def verify_shards(folder: str | Path) -> list[str]:
    """Re-hash and re-count every shard against manifest.json. -> problems (empty when all is well)."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        return [f"{path} does not exist; build the shards with `make shards` first"]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        splits = {s: manifest["splits"][s] for s in SPLITS}
        fmt = manifest["image_format"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{path} is not a valid manifest ({type(e).__name__}: {e})"]
    problems: list[str] = []
    listed = set()
    for split, info in splits.items():
        for sh in info["shards"]:
            listed.add(sh["file"])
            p = folder / sh["file"]
            if not p.is_file():
                problems.append(f"{sh['file']}: missing")
                continue
            nbytes = p.stat().st_size
            if nbytes < sh["bytes"]:
                problems.append(f"{sh['file']}: truncated ({nbytes} of {sh['bytes']} bytes)")
            elif nbytes > sh["bytes"]:
                problems.append(f"{sh['file']}: {nbytes} bytes, the manifest says {sh['bytes']}")
            elif durable.sha256_file(p) != sh["sha256"]:
                problems.append(f"{sh['file']}: altered (sha256 differs from the manifest)")
            try:
                samples = _read_samples(p)
            except (tarfile.TarError, OSError, EOFError) as e:
                problems.append(f"{sh['file']}: unreadable tar ({e})")
                continue
            if len(samples) != sh["count"]:
                problems.append(f"{sh['file']}: {len(samples)} samples, the manifest says {sh['count']}")
            missing = [k for k, exts in samples if fmt not in exts]
            if missing:
                problems.append(f"{sh['file']}: {len(missing)} samples without a .{fmt} image (first: {missing[0]})")
        total = sum(sh["count"] for sh in info["shards"])
        if total != info["count"]:
            problems.append(f"{split}: shard counts add up to {total}, the manifest says {info['count']}")
    for p in sorted(folder.iterdir()):
        if SHARD_RE.match(p.name) and p.name not in listed:
            problems.append(f"{p.name}: a shard file the manifest does not list")
    return problems


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _write_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.shards",
        description="Shard an image folder into WebDataset tar files + manifest.json "
                    "(verify them with: python -m pipeline.shards verify shards/NAME).")
    p.add_argument("src", help="image folder: one subfolder per class, or a flat folder (no labels)")
    p.add_argument("--name", help="data set name: output goes to OUT/NAME (default: SRC's folder name)")
    p.add_argument("--size", type=int, default=128, help="image side in px after resize + centre crop (128)")
    p.add_argument("--out", default="shards", help="parent folder of the shard folders (shards)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of images in val, by content hash (0.1)")
    p.add_argument("--format", dest="image_format", default="jpg", choices=STORED_FORMATS,
                   help="stored image format; npy is raw uint8, fastest to read, largest (jpg)")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality 1-100 (95; webp 100 = lossless)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    p.add_argument("--max-samples-per-shard", type=int, default=1000, help="samples per shard at most (1000)")
    p.add_argument("--max-bytes-per-shard", type=int, default=1_000_000_000, help="bytes per shard at most (1e9)")
    p.add_argument("--min-side", type=int, default=16,
                   help="skip images whose shorter side is below this many px (16; 0 keeps all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.add_argument_group("arrays instead of images (README: 1-D and 3-D data)")
    a.add_argument("--spatial-dims", type=int, default=2, choices=(1, 2, 3),
                   help="1: signals (.npy [L] / [C, L], PCM .wav), 3: volumes (.npy [D, H, W] / [C, D, H, W]); "
                        "2: images (default)")
    a.add_argument("--channels-last", action="store_true",
                   help="arrays with a channel axis hold it last ([L, C], [D, H, W, C]) instead of first")
    a.add_argument("--range", nargs=2, type=float, metavar=("LOW", "HIGH"), dest="value_range",
                   help="values mapped to the model's range (default: the data set's min and max); recorded "
                        "in the manifest, values outside are clipped when read")
    g = p.add_argument_group("on a SLURM array (slurm/shards.sbatch; the result is byte-identical to one process)")
    g.add_argument("--parts", type=int, help="the number of parts the file list is cut into (array tasks)")
    g.add_argument("--part", type=int, help="process part PART (0..PARTS-1) into OUT/.NAME.parts/ (an array task)")
    g.add_argument("--merge", action="store_true", help="write the shards from all PARTS parts (the merge job)")
    g.add_argument("--slurm", action="store_true",
                   help="submit an array of PARTS tasks and the merge job after it (slurm/shards.sbatch); "
                        "everything after -- goes to sbatch (-p cpu, --cpus-per-task=16, ...)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "verify":
        p = argparse.ArgumentParser(prog="python -m pipeline.shards verify",
                                    description="Re-hash and re-count shards against their manifest.json.")
        p.add_argument("folder", help="a shard folder, e.g. shards/flowers")
        folder = Path(p.parse_args(argv[1:]).folder)
        problems = verify_shards(folder)
        for line in problems:
            print(f"problem: {line}", file=sys.stderr)
        if problems:
            print(f"{folder}: {len(problems)} problem{'s' if len(problems) > 1 else ''}; rebuild with `make shards`",
                  file=sys.stderr)
            return 1
        m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        n = sum(len(m["splits"][s]["shards"]) for s in SPLITS)
        print(f"{folder}: OK ({n} shards, train {m['splits']['train']['count']}, val {m['splits']['val']['count']})")
        return 0
    sbatch_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = _write_parser().parse_args(argv)
    options = dict(val_fraction=args.val_fraction, image_format=args.image_format, quality=args.quality,
                   max_samples_per_shard=args.max_samples_per_shard, max_bytes_per_shard=args.max_bytes_per_shard,
                   min_side=args.min_side, progress=not args.no_progress)
    try:
        modes = (args.part is not None) + args.merge + args.slurm
        if (modes > 0) != (args.parts is not None) or modes > 1:
            raise ShardsError("--parts goes with exactly one of --slurm (submit the array and the merge), "
                              "--part I (an array task) or --merge (the merge job)")
        if args.parts is not None and args.spatial_dims != 2:
            raise ShardsError("--parts shards images only; shard arrays (--spatial-dims 1 or 3) in one process")
        if args.slurm:
            _check_parts(None, args.parts)
            submit_slurm([a for a in argv if a != "--slurm"], args.parts, sbatch_args)
        elif args.merge:
            merge_parts(args.src, args.out, args.name, args.size, parts=args.parts, **options)
        elif args.part is not None:
            write_part(args.src, args.out, args.name, args.size, part=args.part, parts=args.parts,
                       workers=args.workers, **options)
        else:
            write_shards(args.src, args.out, args.name, args.size, workers=args.workers, **options,
                         spatial_dims=args.spatial_dims, channels_last=args.channels_last,
                         value_range=tuple(args.value_range) if args.value_range else None)
    except UserError as e:  # ShardsError, and durable's sentence for a write that failed (a full disk)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Import by the package name so the tasks sent to spawned workers pickle as pipeline.shards._Task.
    from pipeline.shards import main as _main

    sys.exit(_main())
