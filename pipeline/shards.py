"""Image folder -> verified WebDataset shards + manifest.json.

    python -m pipeline.shards data/flowers --name flowers --size 128      # (make shards)
    python -m pipeline.shards verify shards/flowers                       # (make verify NAME=flowers)

SRC holds one subfolder per class (data/flowers/daisy/..., the Kaggle layout) or is a flat folder
of images (no labels). Every image is decoded once (EXIF orientation, correct RGB whatever the
mode), hashed on its decoded pixels, resized (shorter side -> SIZE, Lanczos), centre-cropped and
encoded (jpg by default; png, webp or raw npy with --format). The pixel hash is the sample key:
it decides the split (so adding files never moves an image between train and val) and finds exact
duplicates, which are stored once.

Every tar member gets fixed metadata (mtime 0, uid/gid 0, mode 0444) and samples are written in
a fixed order, so the same inputs and options give byte-identical shards. A run writes into a
hidden staging folder (shards/.NAME.partial), renames each shard when it is complete, writes the
manifest last (tmp + os.replace) and only then swaps the folder into place: an interrupted run
leaves the previous complete set untouched and nothing new that looks complete.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import PIL
from tqdm import tqdm

from pipeline.images import (IMAGE_EXTENSIONS, STORED_FORMATS, describe_error, encode_image, load_rgb,
                             resize_center_crop)

MANIFEST_FORMAT = 1
KEY_HEX_CHARS = 20  # 80 bits of the pixel hash: a collision among 10^7 images has odds ~1e-10
SPLITS = ("train", "val")
SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")
# Directories that are never class folders: macOS zip debris and version-control/hidden folders.
IGNORED_DIRS = {"__MACOSX"}
FLOWERS_URL = "https://www.kaggle.com/datasets/alxmamaev/flowers-recognition"


class ShardsError(Exception):
    """A user mistake (bad SRC, bad option, foreign files in the output). One sentence; exit 2."""


@dataclass(frozen=True)
class _Task:
    path: str  # absolute, for opening
    rel: str  # relative to SRC, POSIX separators: what the manifest and the json member record
    label: int  # class index, -1 in a flat folder
    size: int
    image_format: str
    quality: int
    min_side: int


# ------------------------------------------------------------------------------------------------
# Source scanning
# ------------------------------------------------------------------------------------------------


def _source_hint(src: Path) -> str:
    if src.name == "flowers":
        return (f"download the Kaggle data set alxmamaev/flowers-recognition ({FLOWERS_URL}) and "
                f"unpack it so that {src}/daisy/ exists, or run `make demo-data` for offline demo images")
    return ("pass a folder of images (one subfolder per class, or a flat folder), "
            "or run `make demo-data` for offline demo images")


def scan_source(src: Path) -> tuple[list[str], list[tuple[str, str, int]], list[dict]]:
    """-> (classes, [(abs path, rel path, label)], skipped). Files whose extension is not an image
    one are ignored silently; hidden files and folders are ignored."""
    if not src.exists():
        raise ShardsError(f"source folder {src} does not exist; {_source_hint(src)}")
    if not src.is_dir():
        raise ShardsError(f"source {src} is not a folder; {_source_hint(src)}")
    found: list[tuple[str, str]] = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in IGNORED_DIRS)
        for f in sorted(files):
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(root, f)
            found.append((path, Path(os.path.relpath(path, src)).as_posix()))
    if not found:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise ShardsError(f"source folder {src} holds no image files ({exts}); {_source_hint(src)}")
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


def _process(task: _Task) -> dict:
    """Decode, hash, resize, encode one file. Never raises for a bad file: returns {"error": reason}."""
    try:
        if os.path.getsize(task.path) == 0:
            return {"error": "empty file (0 bytes)"}
        img = load_rgb(task.path)
        w, h = img.size
        if min(w, h) < task.min_side:
            return {"error": f"too small ({w}x{h} px; the shorter side must be at least {task.min_side} px, "
                             f"see --min-side)"}
        # The key hashes the decoded pixels (after orientation and RGB conversion), not the file
        # bytes: the same picture re-saved or with its metadata stripped is still a duplicate.
        digest = hashlib.sha256(b"%dx%d:" % (w, h) + img.tobytes()).hexdigest()
        arr = np.asarray(resize_center_crop(img, task.size), dtype=np.uint8)
        return {"hash": digest, "data": encode_image(arr, task.image_format, task.quality),
                "width": w, "height": h}
    except Exception as e:  # a bad file must never stop the run
        return {"error": describe_error(e)}


def is_val(digest: str, val_fraction: float) -> bool:
    """The split is a pure function of the content hash: adding files never moves an image."""
    return int(digest[:16], 16) < val_fraction * 2**64


# ------------------------------------------------------------------------------------------------
# Tar writing
# ------------------------------------------------------------------------------------------------


class _HashingFile:
    """Write-through file wrapper that sha256-hashes and counts what tarfile writes."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        if self.f is None:  # aborted: tarfile's finaliser may still try to flush; drop it
            return len(b)
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        if self.f is not None:
            self.f.flush()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Everything fixed: tarfile would otherwise be fine, but webdataset's TarWriter stamps
    # time.time() as mtime unless given one, which breaks byte-identical re-runs.
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def _member_bytes(size: int) -> int:
    return 512 + (size + 511) // 512 * 512  # header + data padded to the 512-byte block


class _SplitWriter:
    """Writes one split's samples into <split>-000000.tar, ... capped by count and bytes. Each shard is
    written as <file>.tmp and renamed when closed."""

    def __init__(self, folder: Path, split: str, max_samples: int, max_bytes: int):
        self.folder, self.split = folder, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict] = []
        self.tar = None

    def write(self, members: list[tuple[str, bytes]]) -> None:
        size = sum(_member_bytes(len(data)) for _, data in members)
        if self.tar is not None and (self.count >= self.max_samples or self.nbytes + size > self.max_bytes):
            self.close()
        if self.tar is None:
            self._open()
        for name, data in members:
            self.tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self.count += 1
        self.nbytes += size

    def _open(self) -> None:
        self.file_name = f"{self.split}-{len(self.shards):06d}.tar"
        self.tmp = self.folder / (self.file_name + ".tmp")
        self.raw = open(self.tmp, "wb")
        self.hashing = _HashingFile(self.raw)
        self.tar = tarfile.open(fileobj=self.hashing, mode="w|", format=tarfile.USTAR_FORMAT)
        self.count, self.nbytes = 0, 0

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()  # end-of-archive blocks, padded to the record size
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()
        os.replace(self.tmp, self.folder / self.file_name)
        self.shards.append({"file": self.file_name, "count": self.count, "bytes": self.hashing.bytes,
                            "sha256": self.hashing.sha.hexdigest()})
        self.tar = None

    def abort(self) -> None:
        if self.tar is not None:
            self.hashing.f = None
            self.raw.close()
            self.tar = None


# ------------------------------------------------------------------------------------------------
# Output folder: staging, locking and the final swap
# ------------------------------------------------------------------------------------------------


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
            os.rename(self.old, self.final)  # killed between the two renames: restore the old set
        elif (self.final / "manifest.json").is_file():
            shutil.rmtree(self.old)  # killed after the swap, before the clean-up
        else:
            raise ShardsError(f"{self.final} has no manifest.json but a previous set is parked at {self.old}; "
                              f"keep the one you want and remove the other")

    def commit(self) -> None:
        """Swap the complete staging folder into place."""
        if self.final.exists():
            os.rename(self.final, self.old)
            os.rename(self.stage, self.final)
            shutil.rmtree(self.old)
        else:
            os.rename(self.stage, self.final)

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
    """Results in task order. One worker runs in this process (the honest single-core figure)."""
    if workers <= 1 or len(tasks) < 2:
        yield from map(_process, tasks)
        return
    # spawn: no fork of a possibly multi-threaded parent; workers import only numpy/PIL.
    ctx = multiprocessing.get_context("spawn")
    chunk = max(1, min(32, len(tasks) // (workers * 8)))
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


def write_shards(src: str | Path, out_dir: str | Path = "shards", name: str | None = None, size: int = 128, *,
                 val_fraction: float = 0.1, image_format: str = "jpg", quality: int = 95,
                 workers: int | None = None, max_samples_per_shard: int = 1000,
                 max_bytes_per_shard: int = 1_000_000_000, min_side: int = 16, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    """Shard the image folder `src` into out_dir/name (name defaults to src's folder name).
    Returns the manifest. Raises ShardsError (one sentence) on a user mistake."""
    t0 = time.perf_counter()
    src = Path(src)
    name = name or src.resolve().name
    fmt = _check_options(size, val_fraction, image_format, quality, max_samples_per_shard,
                         max_bytes_per_shard, min_side)
    workers = default_workers() if not workers or workers < 1 else workers
    classes, items, skipped = scan_source(src)
    # Process in an order fixed by a hash of the relative path: deterministic, and it mixes the
    # classes inside every shard, which a streaming reader's shuffle buffer needs.
    items.sort(key=lambda it: hashlib.sha256(it[1].encode("utf-8")).digest())
    tasks = [_Task(path, rel, label, size, fmt, quality, min_side) for path, rel, label in items]

    duplicates: list[dict] = []
    per_class = {s: {c: 0 for c in classes} for s in SPLITS}
    seen: dict[str, str] = {}  # full pixel hash -> rel path of the stored copy
    folder = _OutputFolder(Path(out_dir), name)
    with folder as stage:
        writers = {s: _SplitWriter(stage, s, max_samples_per_shard, max_bytes_per_shard) for s in SPLITS}
        bar = tqdm(total=len(tasks), unit="img", desc=f"shards/{name}", disable=not progress,
                   dynamic_ncols=True, file=sys.stderr)
        try:
            for task, res in zip(tasks, _results(tasks, workers)):
                bar.update(1)
                if "error" in res:
                    skipped.append({"path": task.rel, "reason": res["error"]})
                    continue
                digest = res["hash"]
                if digest in seen:
                    duplicates.append({"path": task.rel, "same_as": seen[digest]})
                    continue
                seen[digest] = task.rel
                key = digest[:KEY_HEX_CHARS]
                split = "val" if is_val(digest, val_fraction) else "train"
                meta = {"path": task.rel, "class": classes[task.label] if classes else None,
                        "width": res["width"], "height": res["height"]}
                members = [(f"{key}.{fmt}", res["data"])]
                if classes:
                    members.append((f"{key}.cls", b"%d" % task.label))
                    per_class[split][classes[task.label]] += 1
                members.append((f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()))
                writers[split].write(members)
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
            raise ShardsError(f"none of the {len(tasks)} image files in {src} could be decoded (reasons above); "
                              f"{_source_hint(src)}")
        manifest = {
            "format": MANIFEST_FORMAT, "name": name, "size": size, "image_format": fmt, "classes": classes,
            "splits": {s: {"count": sum(sh["count"] for sh in writers[s].shards), "per_class": per_class[s],
                           "shards": writers[s].shards} for s in SPLITS},
            "skipped": skipped, "duplicates": duplicates,
            "options": {"src": str(src), "size": size, "val_fraction": val_fraction, "image_format": fmt,
                        "quality": quality, "max_samples_per_shard": max_samples_per_shard,
                        "max_bytes_per_shard": max_bytes_per_shard, "min_side": min_side},
            "versions": {"pillow": PIL.__version__, "numpy": np.__version__},
        }
        _atomic_write_json(stage / "manifest.json", manifest)  # last: its presence means complete
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
    log(f"{folder.final}: wrote {written} images (train {manifest['splits']['train']['count']}, "
        f"val {manifest['splits']['val']['count']}) in {n_shards} shards; skipped {len(skipped)}, "
        f"duplicates {len(duplicates)}; {seconds:.1f} s ({len(tasks) / max(seconds, 1e-9):.0f} images/s, "
        f"{workers} worker{'s' if workers > 1 else ''})")
    return manifest


# ------------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
            elif _sha256_file(p) != sh["sha256"]:
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
    args = _write_parser().parse_args(argv)
    try:
        write_shards(args.src, args.out, args.name, args.size, val_fraction=args.val_fraction,
                     image_format=args.image_format, quality=args.quality, workers=args.workers,
                     max_samples_per_shard=args.max_samples_per_shard,
                     max_bytes_per_shard=args.max_bytes_per_shard, min_side=args.min_side,
                     progress=not args.no_progress)
    except ShardsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Import by the package name so the tasks sent to spawned workers pickle as pipeline.shards._Task.
    from pipeline.shards import main as _main

    sys.exit(_main())
