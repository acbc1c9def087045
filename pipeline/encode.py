"""Encode a whole dataset into latent shards on N processes x M nodes: exactly once, resumable.

    python -m pipeline.sample runs/x encode shards/big --format shards --out latents/big            # 1 process
    accelerate launch --multi_gpu --num_processes 8 -m pipeline.sample runs/x encode shards/big \\
        --format shards --out latents/big                                                         # 8 GPUs
    sbatch --nodes=4 slurm/encode.sbatch runs/x shards/big --out latents/big                      # 4 nodes

The unit of work is one output shard: the samples of one source shard of the chosen split(s), read in
stored order, written to `<split>-NNNNNN.tar` (numbered per split over the inputs, in order). Units
are dealt round-robin to the ranks and, within a rank, to the DataLoader workers; batches never
cross a unit, so what a unit holds — and every number in it — does not depend on how many processes,
nodes or workers there are. A unit is written under a temporary name and renamed when complete, then
its sidecar `<split>-NNNNNN.json` is written (count, sha256, the float64 per-channel sum and sum of
squares of its latents). When every rank is done, rank 0 merges the sidecars in unit order into
`manifest.json` — written last, so a folder with a manifest is complete and one without is not.

Resume: run the same command again. Units whose sidecar exists and whose tar has the sidecar's sha256
are kept; the rest are encoded again. `encode.json`, written first, records what the folder is an
encoding of (run, checkpoint, inputs and their manifests, options); a command that would encode
something else into it is refused with one sentence. SIGUSR1 / SIGTERM: each rank finishes its batch,
drops its unfinished units and exits 75 (as training does); slurm/encode.sbatch requeues the job.

Quantized models (model.quantizer) store `--store codes`: `<key>.codes.npy`, the integer code map [*code_grid]
(uint16 when the codebook has at most 65,536 codes, else int32) — the tokenized dataset a prior model
trains on; `mu` is then z_e before quantization, and the statistics are of the codes' vectors.
Each sample of a latent shard: `<key>.mu.npy` (and/or `.logvar.npy`, `.z.npy`: --store), `<key>.cls`
when labelled, `<key>.json` {key, label, class, source}. Arrays are plain .npy (np.load(...,
allow_pickle=False)); bf16 is stored as its uint16 bit pattern (torch.from_numpy(a).view(torch.bfloat16)).
`z` is mu + sigma * eps with eps seeded by (sample key, --seed): the same for any number of processes.
The manifest's `channel_mean` / `channel_std` are over every stored value of the statistics' array
(`stats_of`: z when stored, else mu) per latent channel, and `scaling_factor` = 1 / the std over all
of its values (latent diffusion's convention).

Spatial-latent models take source images larger than their training size through tiles
(pipeline.tiling, --tile-size, --tile-overlap); the latents are then larger too.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import durable
from pipeline.errors import UserError
from pipeline.data import IMAGE_EXTS, read_manifest, read_tars
from pipeline.images import decode_image
from pipeline.inference import LoadedRun, key_noise, load_run
from pipeline.preemption import EXIT_PREEMPTED, SIGNALS, start_compile_workers
from pipeline.runs import RunLock, die_with_parent, launched_by_torchrun, own_run_folder
from pipeline.models.quantize import codes_dtype, keep_eager
from pipeline import faults, tiling

SPEC_FILE = "encode.json"
MANIFEST_FILE = "manifest.json"
FORMAT = 1
STORE_CHOICES = ("mu", "logvar", "z", "codes")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PREFETCH_BATCHES = 2


@dataclass(frozen=True)
class Unit:
    """One output shard: every sample of one source shard."""

    index: int
    """Position in the global unit order (inputs, then splits, then the manifest's shard order)."""
    split: str
    file: str
    """Output file name, <split>-NNNNNN.tar."""
    source: str
    """The source tar's path."""
    source_name: str
    """<shards name>:<file>: what each sample's JSON calls its source."""
    count: int
    """Samples the source manifest lists for this shard."""
    image_ext: str

    @property
    def sidecar(self) -> str:
        return self.file[:-len(".tar")] + ".json"


def plan_units(inputs: list[Path], splits: tuple[str, ...]) -> list[Unit]:
    units: list[Unit] = []
    per_split = {s: 0 for s in splits}
    for folder in inputs:
        m = read_manifest(folder)
        for split in splits:
            for shard in m["splits"][split]["shards"]:
                source = durable.inside(folder, shard["file"], f"{folder / 'manifest.json'}")
                units.append(Unit(len(units), split, f"{split}-{per_split[split]:06d}.tar", str(source),
                                  f"{m.get('name', folder.name)}:{shard['file']}", int(shard["count"]),
                                  m["image_format"]))
                per_split[split] += 1
    return units


# --------------------------------------------------------------------------------------------
# Reading: one unit at a time per DataLoader worker, in stored order
# --------------------------------------------------------------------------------------------


def _decode(sample: dict, exts: tuple[str, ...], size: int) -> tuple[np.ndarray, int] | None:
    """A raw sample (pipeline.data.read_tars) -> (uint8 HxWx3, label), or None when it cannot be used."""
    if sample.get("__missing__") or sample.get("__bad__"):
        return None
    ext = next((e for e in exts if e in sample), None)
    if ext is None:
        return None
    try:
        image = decode_image(sample[ext], ext)
        label = int(sample["cls"].decode("ascii").strip()) if "cls" in sample else -1
    except Exception:  # noqa: BLE001 - any failure of one sample is that sample's problem
        return None
    if image.shape != (size, size, 3):
        return None
    return image, label


class _UnitReader(IterableDataset):
    """Batches of this rank's units; worker w reads units w, w + W, ... whole and in order. Every batch
    is (unit index, uint8 [n,H,W,3], labels, keys, skipped keys, last batch of its unit?)."""

    def __init__(self, units: list[Unit], size: int, batch_size: int):
        self.units, self.size, self.batch_size = units, size, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for unit in self.units[worker::workers]:
            exts = (unit.image_ext,) + tuple(e for e in IMAGE_EXTS if e != unit.image_ext)
            images, labels, keys, skipped = [], [], [], []
            # The data layer's tar stage: whitelisted members only, a short shard padded to its count.
            for sample in read_tars(iter([{"path": unit.source, "count": unit.count, "start": 0,
                                           "stop": unit.count}])):
                decoded = _decode(sample, exts, self.size)
                if decoded is None:
                    skipped.append(sample["__key__"])
                    continue
                images.append(decoded[0])
                labels.append(decoded[1])
                keys.append(sample["__key__"])
                if len(keys) == self.batch_size:
                    yield unit.index, torch.from_numpy(np.stack(images)), labels, keys, skipped, False
                    images, labels, keys, skipped = [], [], [], []
            pixels = torch.from_numpy(np.stack(images)) if images else torch.empty((0, self.size, self.size, 3),
                                                                                   dtype=torch.uint8)
            yield unit.index, pixels, labels, keys, skipped, True


def _worker_init(worker_id: int) -> None:
    die_with_parent()  # a reader never outlives the process it reads for


def _batches(units: list[Unit], size: int, batch_size: int, workers: int, pin: bool) -> Iterator[tuple]:
    reader = _UnitReader(units, size, batch_size)
    if workers == 0 or len(units) <= 1:
        yield from reader
        return
    loader = DataLoader(reader, batch_size=None, num_workers=min(workers, len(units)), pin_memory=pin,
                        prefetch_factor=PREFETCH_BATCHES, worker_init_fn=_worker_init, persistent_workers=False)
    source = iter(loader)
    try:
        yield from source
    finally:
        source._shutdown_workers()  # now, also when the consumer stops early (a signal)


# --------------------------------------------------------------------------------------------
# Writing: one tar per unit, under a temporary name; its sidecar marks it complete
# --------------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class _UnitWriter:
    """The tar of one unit being written, with the running float64 statistics of its latents."""

    def __init__(self, out: Path, unit: Unit, channels: int):
        self.out, self.unit = out, unit
        self.file = durable.Writer(out / unit.file)  # under .<file>.tmp-<pid> until commit
        self.tar = tarfile.open(fileobj=self.file.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.skipped: list[str] = []
        self.sum = np.zeros(channels, dtype=np.float64)
        self.sumsq = np.zeros(channels, dtype=np.float64)
        self.values_per_channel = 0

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)  # uid, gid, names 0/empty: the bytes depend on the content only
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, keys: list[str], arrays: dict[str, np.ndarray], labels: list[int], classes: list[str],
            stats: np.ndarray) -> None:
        """One batch: arrays name -> [n, *latent] as stored; stats: the statistics' array as float64."""
        for i, key in enumerate(keys):
            durable.sample_key(key, f"shard {self.unit.source}")  # it becomes a member name
            for name, arr in arrays.items():
                self._member(f"{key}.{name}.npy", npy_bytes(arr[i]))
            label = int(labels[i])
            if label >= 0:
                self._member(f"{key}.cls", str(label).encode("ascii"))
            row = {"key": key, "label": label, "class": classes[label] if 0 <= label < len(classes) else "",
                   "source": self.unit.source_name}
            self._member(f"{key}.json", json.dumps(row, sort_keys=True).encode("utf-8"))
        if len(keys):
            axes = (0, *range(2, stats.ndim))  # every axis but the channel's
            self.sum += stats.sum(axis=axes)  # numpy's pairwise sum: the same order on every machine
            self.sumsq += np.square(stats).sum(axis=axes)
            self.values_per_channel += stats.size // stats.shape[1]
        self.count += len(keys)

    def commit(self, writer: dict) -> dict:
        """Close the tar, put it in place durably, then write its sidecar (the completion mark)."""
        self.tar.close()
        final = self.file.commit()
        sidecar = {"file": self.unit.file, "source": self.unit.source_name, "split": self.unit.split,
                   "count": self.count, "skipped": self.skipped, "sha256": durable.sha256_file(final),
                   "bytes": final.stat().st_size, "channel_sum": self.sum.tolist(),
                   "channel_sumsq": self.sumsq.tolist(), "values_per_channel": self.values_per_channel,
                   "writer": writer}
        durable.write_json(self.out / self.unit.sidecar, sidecar, end="\n", indent=1, sort_keys=True)
        return sidecar

    def abort(self) -> None:
        try:
            self.tar.close()
        finally:
            self.file.abort()


def unit_is_complete(out: Path, unit: Unit) -> bool:
    """The unit's sidecar exists and its tar has the sidecar's sha256."""
    side, tar = out / unit.sidecar, out / unit.file
    if not (side.is_file() and tar.is_file()):
        return False
    try:
        sidecar = json.loads(side.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        return False
    return sidecar.get("sha256") == durable.sha256_file(tar) and sidecar.get("file") == unit.file


# --------------------------------------------------------------------------------------------
# What the folder is an encoding of
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeOptions:
    """The command-line choices that change what is written (recorded in encode.json)."""

    splits: tuple[str, ...]
    store: tuple[str, ...]
    """Arrays stored per sample, from mu, logvar, z."""
    dtype: str
    """fp32 | fp16 | bf16"""
    seed: int
    """Seed of z's per-sample noise (with the sample's key)."""
    batch_size: int
    """Images per model call (batches never cross a unit)."""
    precision: str
    """fp32 | bf16 (autocast)."""
    tile_px: int
    overlap_px: int


def parse_store(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in STORE_CHOICES]
    if not names or bad or len(set(names)) != len(names):
        raise UserError(f"--store must be a comma-separated list of distinct names from "
                          f"{', '.join(STORE_CHOICES)}, got {text!r}")
    return tuple(s for s in STORE_CHOICES if s in names)


def check_store(store: tuple[str, ...], model) -> None:
    """codes need a quantized bottleneck; logvar and z a Gaussian one."""
    quantized = getattr(model, "quantizer", None) is not None
    if quantized and ({"logvar", "z"} & set(store)):
        raise UserError(f"--store {','.join(store)}: this run's latent is quantized, so it has no logvar or sampled z; "
                          f"store codes (integer code maps) and/or mu (z_e before quantization)")
    if not quantized and "codes" in store:
        raise UserError("--store codes needs a quantized model (model.quantizer.kind vq, ema or fsq); this run's "
                          "latent is Gaussian: store mu, logvar or z")


def _manifest_sha(folder: Path) -> str:
    return hashlib.sha256((folder / MANIFEST_FILE).read_bytes()).hexdigest()


def encode_spec(run: LoadedRun, inputs: list[Path], options: EncodeOptions) -> dict:
    return {"format": FORMAT, "run_dir": str(run.run_dir.resolve()), "checkpoint": run.checkpoint.name,
            "step": run.step, "weights": run.weights,
            "inputs": [{"path": str(p.resolve()), "manifest_sha256": _manifest_sha(p)} for p in inputs],
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()}}


def _spec_difference(old: dict, new: dict) -> str | None:
    """The first field in which two specs differ, described for the user; None when they agree."""
    for key in ("run_dir", "checkpoint", "weights"):
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key)} (this command: {new.get(key)})"
    old_paths, new_paths = [i["path"] for i in old.get("inputs", [])], [i["path"] for i in new["inputs"]]
    if old_paths != new_paths:
        return f"inputs {old_paths} (this command: {new_paths})"
    if old.get("inputs") != new["inputs"]:
        return "inputs whose manifest.json has since changed"
    for key, value in new["options"].items():
        if old.get("options", {}).get(key) != value:
            return f"{key}={old.get('options', {}).get(key)} (this command: {value})"
    return None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Stop:
    """SIGUSR1 / SIGTERM set a flag; the loop stops after its batch (no collective: ranks run different
    numbers of batches, so each stops on its own, and the launcher ends a rank that did not get it)."""

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name


def _source_size(inputs: list[Path], run: LoadedRun, options: EncodeOptions) -> int:
    """The inputs' image size (one for all); larger than the model's only for a spatial latent, tiled."""
    sizes = {int(read_manifest(p)["size"]) for p in inputs}
    if len(sizes) > 1:
        raise UserError(f"the inputs hold images of different sizes ({', '.join(map(str, sorted(sizes)))} px); "
                          f"encode them into separate --out folders")
    (size,) = sizes
    if size != run.image_size:
        f = tiling.downsampling_factor(run.model)
        if f is None or size < run.image_size:
            raise UserError(f"shards {inputs[0]} hold {size} px images but the model was trained on "
                              f"{run.image_size} px; make shards with --size {run.image_size}"
                              + ("" if f is None else " (or larger: spatial-latent models encode larger images "
                                                      "in tiles)"))
        if size % f:
            raise UserError(f"shards {inputs[0]} hold {size} px images, which the model's downsampling factor "
                              f"{f} does not divide; make shards with a --size that is a multiple of {f}")
    return size


def _prepare_folder(out: Path, spec: dict, force: bool, accelerator) -> bool:
    """Check (and on rank 0 set up) the output folder. Returns True when it is already complete."""
    spec_path, manifest = out / SPEC_FILE, out / MANIFEST_FILE
    old = None
    if spec_path.is_file() and not force:
        try:
            old = json.loads(spec_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{spec_path} is not valid JSON; pass --force to start this folder over or choose "
                              f"another --out") from None
        diff = _spec_difference(old, spec)
        if diff:
            raise UserError(f"{out} holds an encoding with {diff}; run the command that made it to continue it, "
                              f"pass --force to start it over, or choose another --out")
    elif out.is_dir() and not force and any(out.glob("*-[0-9]*.tar")):
        raise UserError(f"{out} holds latent shards without {SPEC_FILE} (written by another tool or an older "
                          f"version); pass --force to replace them or choose another --out")
    if old is not None and manifest.is_file():
        return True
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if force:
            for p in [*out.glob("*-[0-9]*.tar"), *out.glob("*-[0-9]*.json"), manifest, spec_path]:
                p.unlink(missing_ok=True)
        for p in out.glob(".*.tmp-*"):  # left by a killed start; nobody else writes here (the lock)
            p.unlink(missing_ok=True)
        if old is None:
            durable.write_json(spec_path, spec, end="\n", indent=1, sort_keys=True)
    return False


def _lock(out: Path, accelerator) -> RunLock | None:
    """Rank 0 holds out/.lock for the whole encode: two launches never write one folder."""
    return own_run_folder(out, accelerator, busy=lambda e: UserError(
        f"{out} is being written by another encode that is still running (its holder is named in "
        f"{out / '.lock'}); wait for it to finish or choose another --out"))


def _complete_units(out: Path, units: list[Unit], accelerator) -> list[bool]:
    """Which units are complete, each verified (sha256) by one rank, agreed by all."""
    rank, world = accelerator.process_index, accelerator.num_processes
    done = torch.zeros(len(units), dtype=torch.int32, device=accelerator.device)
    for u in units[rank::world]:
        done[u.index] = int(unit_is_complete(out, u))
    if world > 1:
        done = accelerator.reduce(done, "sum")
    return [bool(d) for d in done.tolist()]


def merge_manifest(out: Path, run: LoadedRun, units: list[Unit], spec: dict, options: EncodeOptions,
                   latent_shape: list[int], image_size: int) -> dict:
    """manifest.json from the sidecars, merged in unit order (so the sums are the same for any world size)."""
    sidecars = [json.loads((out / u.sidecar).read_text(encoding="utf-8")) for u in units]
    channels = len(sidecars[0]["channel_sum"]) if sidecars else 0
    s, ss, n = np.zeros(channels), np.zeros(channels), 0
    splits: dict[str, dict] = {split: {"count": 0, "shards": []} for split in options.splits}
    skipped = []
    for u, side in zip(units, sidecars):
        s += np.asarray(side["channel_sum"], dtype=np.float64)
        ss += np.asarray(side["channel_sumsq"], dtype=np.float64)
        n += int(side["values_per_channel"])
        splits[u.split]["count"] += side["count"]
        splits[u.split]["shards"].append({"file": u.file, "count": side["count"], "sha256": side["sha256"],
                                          "source": u.source_name})
        skipped += [{"key": k, "source": u.source_name} for k in side["skipped"]]
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(ss / max(n, 1) - mean**2, 0.0))
    total_mean = s.sum() / max(n * channels, 1)
    total_std = math.sqrt(max(ss.sum() / max(n * channels, 1) - total_mean**2, 0.0))
    stats_of = ("z" if "z" in options.store else "mu" if "mu" in options.store else
                "codes (their latent vectors)" if "codes" in options.store else "logvar")
    quantizer = getattr(run.model, "quantizer", None)
    codes = ({"num_codes": quantizer.num_codes, "code_grid": [latent_shape[0] // quantizer.token_dim]
              if quantizer.layout == "vector" else latent_shape[1:], "codes_dtype": codes_dtype(quantizer.num_codes).name,
              "quantizer": quantizer.kind} if quantizer is not None and "codes" in options.store else {})
    manifest = {
        "format": FORMAT, "kind": "latents", "name": out.name, "run_dir": spec["run_dir"],
        "checkpoint": spec["checkpoint"], "step": spec["step"], "weights": spec["weights"],
        "image_size": image_size, "model_image_size": run.image_size, "latent_shape": latent_shape,
        "latent_dtype": DTYPE_NAMES[options.dtype],
        "stored_as": "uint16 bit patterns of bfloat16" if options.dtype == "bf16" else DTYPE_NAMES[options.dtype],
        "members": [f"{name}.npy" for name in options.store] + ["cls", "json"], "classes": run.classes,
        "stats_of": stats_of, "channel_mean": mean.tolist(), "channel_std": std.tolist(),
        "scaling_factor": (1.0 / total_std) if total_std > 0 else None,
        "splits": splits, "skipped": skipped, "inputs": spec["inputs"], "options": spec["options"], **codes,
    }
    durable.write_json(out / MANIFEST_FILE, manifest, end="\n", indent=1, sort_keys=True)
    return manifest


def _latent_shape(run: LoadedRun, size: int) -> list[int]:
    shape = list(run.model.latent_shape)
    if size != run.image_size:
        f = tiling.downsampling_factor(run.model)
        shape = [shape[0], size // f, size // f]
    return shape


def _to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    t = t.to(DTYPES[dtype]).cpu()
    if dtype == "bf16":  # numpy has no bfloat16: keep its bits
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _as_float64(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).to(torch.float64).numpy()
    return arr.astype(np.float64)


def run_encode(args) -> int:
    """`python -m pipeline.sample RUN encode SHARDS --format shards --out DIR` (under any launcher)."""
    from accelerate import Accelerator

    if launched_by_torchrun():
        die_with_parent()
    if not args.out:
        raise UserError("--format shards needs --out DIR (the folder the latent shards go to)")
    inputs = [Path(p) for p in args.inputs]
    for p in inputs:
        if not (p / MANIFEST_FILE).is_file():
            raise UserError(f"{p} is not a shards folder (no manifest.json); --format shards encodes shards "
                              f"folders: make shards from the images first (make shards SRC={p})")
    accelerator = Accelerator(cpu=args.device == "cpu")
    device = torch.device(args.device) if args.device and accelerator.num_processes == 1 else accelerator.device
    run = load_run(args.run_dir, (), args.checkpoint, args.weights, device, args.image_size)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    tile = args.tile_size or run.image_size
    options = EncodeOptions(splits=("train", "val") if args.split == "all" else (args.split,),
                            store=parse_store(args.store), dtype=args.dtype, seed=args.seed,
                            batch_size=args.batch_size, precision=precision, tile_px=tile,
                            overlap_px=args.tile_overlap if args.tile_overlap is not None else tile // 4)
    check_store(options.store, run.model)
    size = _source_size(inputs, run, options)
    tiled = size > tile  # larger images, or smaller tiles than the training size: through pipeline.tiling
    if tiled and run.model.quantizer is not None:
        raise UserError(f"the images are {size} px but this quantized model encodes {tile} px tiles; tiled encoding "
                          f"blends latents, which codes cannot be: encode images of the training size")
    if tiled:
        tiling.check_tiling(run.model, tile, options.overlap_px)
    units = plan_units(inputs, options.splits)
    if not units:
        raise UserError(f"{', '.join(map(str, inputs))} list no shards in split {args.split}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")
    spec = encode_spec(run, inputs, options)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    lock = _lock(out, accelerator)
    if _prepare_folder(out, spec, args.force, accelerator):
        accelerator.print(f"{out} is already complete ({MANIFEST_FILE} written); nothing to do")
        return 0
    accelerator.wait_for_everyone()
    done = _complete_units(out, units, accelerator)
    pending = [u for u in units if not done[u.index]]
    mine = pending[accelerator.process_index::accelerator.num_processes]
    accelerator.print(f"encoding {len(pending)} of {len(units)} units on {accelerator.num_processes} processes"
                      + (f" ({len(units) - len(pending)} already complete, sha256 verified)" if len(pending) <
                         len(units) else ""))

    model = run.model.to(memory_format=torch.channels_last)
    if args.compile:
        keep_eager(model)
    encode_fn = torch.compile(model.encode) if args.compile else model.encode
    latent_shape = _latent_shape(run, size)
    if args.compile:
        start_compile_workers()  # before the handlers: the workers must keep ignoring USR1
    stop = _Stop()
    writer_info = {"pid": os.getpid(), "host": os.uname().nodename, "rank": accelerator.process_index,
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    open_units: dict[int, _UnitWriter] = {}
    by_index = {u.index: u for u in units}
    images_done, committed, wait_s = 0, 0, 0.0
    t0 = time.perf_counter()
    batches = _batches(mine, size, args.batch_size, args.num_workers, device.type == "cuda")
    try:
        while True:
            t_wait = time.perf_counter()
            item = next(batches, None)
            wait_s += time.perf_counter() - t_wait
            if item is None:
                break
            index, pixels, labels, keys, skipped, last = item
            unit = by_index[index]
            w = open_units.get(index) or open_units.setdefault(index, _UnitWriter(out, unit, latent_shape[0]))
            w.skipped += skipped
            if keys:
                x = run.to_model_range(pixels.to(device, non_blocking=True).permute(0, 3, 1, 2))
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                     enabled=precision == "bf16"):
                    if tiled:
                        mu, logvar = tiling.tiled_encode(model, x, tile, options.overlap_px)
                    else:
                        mu, logvar = encode_fn(x)
                mu = mu.float()
                logvar = logvar.float() if logvar is not None else None
                arrays = {}
                if "mu" in options.store:
                    arrays["mu"] = _to_numpy(mu, options.dtype)
                if "logvar" in options.store:
                    arrays["logvar"] = _to_numpy(logvar, options.dtype)
                if "z" in options.store:
                    eps = key_noise(keys, mu.shape[1:], 1, options.seed, device)[0]
                    arrays["z"] = _to_numpy(mu + eps * torch.exp(0.5 * logvar), options.dtype)
                stats_of = next((s for s in ("z", "mu", "logvar") if s in arrays), None)
                stats = _as_float64(arrays[stats_of], options.dtype) if stats_of else None
                if "codes" in options.store:
                    with torch.no_grad():
                        q = model.quantizer(mu)
                    arrays["codes"] = q.indices.cpu().numpy().astype(codes_dtype(model.quantizer.num_codes))
                    if stats is None:  # only codes stored: the statistics of their latent vectors
                        stats = q.z_q.float().cpu().numpy().astype(np.float64)
                w.add(keys, arrays, labels, run.classes, stats)
                images_done += len(keys)
            if last:
                open_units.pop(index).commit(writer_info)
                committed += 1
                faults.kill_at("encode-unit", committed, accelerator.is_main_process)
                faults.pause_at("encode-unit", committed)
            if stop.received:
                break
    finally:
        for w in open_units.values():
            w.abort()
        batches.close()
    seconds = time.perf_counter() - t0
    rate = images_done / max(seconds, 1e-9)
    print(f"rank {accelerator.process_index}: encoded {images_done} images in {committed} units, {rate:.1f} images/s, "
          f"data wait {100 * wait_s / max(seconds, 1e-9):.1f} %", flush=True)
    if stop.received:
        accelerator.print(f"received {stop.received}: finished units are kept; exiting with {EXIT_PREEMPTED} "
                          f"(run the same command to continue)")
        print(f"rank {accelerator.process_index} stopped on {stop.received}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = [u.file for u in units if not (out / u.sidecar).is_file()]
        if missing:
            raise RuntimeError(f"units {missing[:3]} are not complete after every rank finished")
        manifest = merge_manifest(out, run, units, spec, options, latent_shape, size)
        counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
        print(f"wrote {out / MANIFEST_FILE}: {counts} samples in {len(units)} shards, latent {latent_shape} "
              f"{manifest['latent_dtype']}, scaling factor {manifest['scaling_factor']}")
    accelerator.wait_for_everyone()
    del lock
    return 0
