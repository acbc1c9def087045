"""Reading shards: the training stream, the validation stream, and the augmentation on the device.

    stream = TrainStream(cfg, rank, world_size)        # infinite; state_dict()/load_state_dict() resume it
    augment = DeviceAugment(cfg.data, model.output_range).to(device)
    for batch in stream:                                # Batch(images uint8 [B,3,H,W] on CPU, labels, keys)
        x = augment(batch.images.to(device, non_blocking=True), train=True)
    for batch in val_batches(cfg, rank, world_size):   # finite; every val sample once over ranks x workers
        ...                                             # no collectives inside this loop (counts differ per rank)

Both streams are explicit WebDataset pipelines (`wds.DataPipeline`, one commented stage per step,
like open_clip's `get_wds_dataset`), run inside torch DataLoader workers (`batch_size=None`: the
workers batch on the CPU themselves). Two stages are our own for speed, measured by
`make bench-data`: tar members are read by a lean header parser (Python's tarfile, which
webdataset uses, costs a third of a 128-px JPEG decode per sample), and batches travel from the
workers through reused shared-memory slots rather than a new shared-memory file per batch.

Exact resume. The training stream of one rank is a pure function of (files, seed, rank, world size,
workers, batch size, shuffle buffer). Each *logical worker* w (one per DataLoader worker; one when
num_workers=0) produces an endless sequence of "worker epochs". In worker epoch e it draws whole
shards with replacement from an RNG seeded by (seed, rank, w, e) until it holds at least
ceil(train count / (world size x workers)) samples, reads them, shuffles them with a buffer whose RNG
is seeded the same way and which is drained at the end of the epoch, then decodes and batches. Every
batch carries its logical worker and a cursor: (epoch, samples of that epoch consumed, corrupt ones
included). The DataLoader hands batch b out from worker b % W, so the stream keeps, per logical
worker, the cursor of the last batch it gave the consumer. To resume after k batches, physical
worker i plays logical worker (i + k) % W (the next batch must come from logical worker k % W), draws
that epoch's shards directly (earlier epochs are never read) and replays the epoch's raw, undecoded
samples through the shuffle buffer up to its cursor: cost at most one worker epoch of tar reading,
no decoding. The state is small plain JSON (see TrainStream.state_dict).

Safety: only whitelisted tar members are ever read (image, cls); images are decoded by
pipeline.images.decode_image, which never unpickles. `.pyd`/`.pickle` members are skipped unread
(webdataset's default decoders would unpickle them). Corrupt samples, and the samples a truncated
or unreadable shard is missing (by its manifest count), are skipped and counted, never a crash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import weakref
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import Config, ConfigError, DataConfig
from pipeline.images import decode_image
from pipeline.runs import die_with_parent

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "png", "webp", "npy")
"""Image member extensions the reader decodes (the only ones pipeline.shards writes)."""
READ_EXTS = frozenset(IMAGE_EXTS + ("cls",))
"""Tar members the streams extract at all. `json` is whitelisted too but no batch needs it, so it is
not even read; anything else (`.pyd`, `.pickle`, ...) is never read, let alone decoded."""
STATE_FORMAT = 2
PREFETCH_BATCHES = 2
"""Batches each DataLoader worker may have ready ahead of the consumer."""
MAX_CONSECUTIVE_BAD = 10_000
"""A reader that meets this many corrupt samples in a row (and at least a whole worker epoch) stops
with an error instead of spinning forever on a dataset with nothing decodable."""


@dataclass
class Batch:
    images: torch.Tensor
    """uint8 [B, 3, H, W] on the CPU, in channels_last memory (the decoder's HxWx3 layout; call
    .contiguous() for NCHW memory); pinned when CUDA is available."""
    labels: torch.Tensor
    """int64 [B]; -1 where the dataset has no classes."""
    keys: list[str]
    """The samples' `__key__`s (stable content hashes)."""

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking), self.keys)


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------


def read_manifest(shards_dir: str | Path) -> dict:
    """Load and check `<shards_dir>/manifest.json`; a problem raises ConfigError with one sentence."""
    d = Path(shards_dir)
    path = d / "manifest.json"
    redo = f"re-run `make shards ... NAME={d.name}`"
    if not path.is_file():
        raise ConfigError(f"data.shards folder {d} has no manifest.json; build it with "
                          f"`make shards SRC=<image folder> NAME={d.name}` (or `make demo-data`)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); {redo}") from None
    if not isinstance(m, dict) or m.get("format") != 1:
        got = m.get("format") if isinstance(m, dict) else None
        raise ConfigError(f"{path} has format {got!r} but this reader needs format 1; {redo}")
    try:
        size, fmt, classes = int(m["size"]), m["image_format"], list(m["classes"])
        for split in ("train", "val"):
            for s in m["splits"][split]["shards"]:
                s["file"], s["count"] = str(s["file"]), int(s["count"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path} lacks a valid field {e}; {redo}") from None
    if fmt not in IMAGE_EXTS:
        raise ConfigError(f"{path} has image_format {fmt!r}; the reader decodes only {', '.join(IMAGE_EXTS)}")
    if size < 1 or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"{path} has an invalid size or class list; {redo}")
    for split in ("train", "val"):
        for s in m["splits"][split]["shards"]:
            if not (d / s["file"]).is_file():
                raise ConfigError(f"shard {d / s['file']} listed in {path} is missing; {redo} "
                                  f"(`make verify NAME={d.name}` checks every shard)")
    return m


def _shards(shards_dir: str | Path, manifest: dict, split: str) -> tuple[tuple[str, int], ...]:
    return tuple((str(Path(shards_dir) / s["file"]), s["count"]) for s in manifest["splits"][split]["shards"])


# --------------------------------------------------------------------------------------------
# Stage building blocks shared by both streams
# --------------------------------------------------------------------------------------------


def _rng(*parts) -> random.Random:
    """An RNG seeded by a hash of `parts` (stable across processes and Python versions)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _octal(field: bytes) -> int:
    """A tar header number: octal digits ended by NUL and/or spaces, or GNU base-256."""
    if field[:1] == b"\x80":  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0] or b"0", 8)  # int() ignores surrounding spaces


def _tar_entries(f, path: str, read: frozenset[str]) -> Iterator[tuple[str, str, int, int, bytes | None]]:
    """(key, extension, offset, size, data) of the regular members of the tar open as `f`, read from
    its current position: `offset` is where the member's data starts, relative to where reading
    began, `size` its length. `data` is read only for the extensions in `read`; other members are
    seeked over.

    A lean ustar/pax/GNU parser instead of `tarfile`, which costs ~100 us per sample here (a third
    of decoding a 128-px JPEG); this one ~9 us. Raises EOFError on a truncated member and
    ValueError on a header that fails its checksum."""
    long_name, offset = None, 0
    while True:
        header = f.read(512)
        if len(header) < 512:
            if header:
                raise EOFError(f"truncated tar header in {path}")
            return  # a tar cut at a member boundary: the manifest count notices what is missing
        if header[0] == 0 and header.count(0) == 512:
            return  # end-of-archive blocks
        # The header checksum is the byte sum with the checksum field read as spaces; zlib's
        # adler32 gives that sum mod 65521 in C (a Python sum() would cost ~6 us a header).
        stored = _octal(header[148:156]) - 256 + sum(header[148:156])
        if zlib.adler32(header) & 0xFFFF != (1 + stored) % 65521:
            raise ValueError(f"corrupt tar header (bad checksum) in {path}")
        size, kind = _octal(header[124:136]), header[156]
        padded = (size + 511) & ~511
        offset += 512 + padded
        if kind in b"xL":  # pax extended header / GNU long name: applies to the next member
            data = f.read(padded)[:size]
            if kind == ord("L"):
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                for record in data.decode("utf-8", "replace").split("\n"):
                    if " path=" in record:
                        long_name = record.split(" path=", 1)[1]
            continue
        name = long_name or header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if not long_name and header[345] != 0 and header[257:262] == b"ustar":
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        long_name = None
        folder, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")  # webdataset's rule: the key ends at the first dot
        ext = ext.lower()
        if kind not in b"0\x007" or not dot or stem.startswith("__"):
            f.seek(padded, 1)
            continue
        data = None
        if ext in read:
            data = f.read(size)
            if len(data) < size:
                raise EOFError(f"truncated tar member {name} in {path}")
            f.seek(padded - size, 1)
        else:
            f.seek(padded, 1)
        yield (f"{folder}/{stem}" if folder else stem), ext, offset - padded, size, data


def _tar_members(path: str, wanted: frozenset[str]) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of the tar's regular members whose extension is in `wanted`, in order.
    Members not wanted are seeked over, never read."""
    with open(path, "rb", buffering=1 << 20) as f:
        for key, ext, _, _, data in _tar_entries(f, path, wanted):
            if data is not None:
                yield key, ext, data


def _group_samples(members: Iterator[tuple[str, str, bytes]]) -> Iterator[dict]:
    """Consecutive members sharing a key -> one sample dict {"__key__", ext: bytes, ...}; a member
    that appears twice in one sample marks it `__bad__` (which copy is right is unknown)."""
    sample: dict | None = None
    for key, ext, data in members:
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        if ext in sample:
            sample["__bad__"] = True
        sample[ext] = data
    if sample is not None:
        yield sample


def _shard_samples(path: str) -> Iterator[dict]:
    """The samples of one tar (consecutive members sharing a key), whitelisted members only.

    Stops quietly (logged) on a broken tar; the sample being assembled when it breaks is dropped,
    as its members may be incomplete."""
    samples = _group_samples(_tar_members(path, READ_EXTS))
    try:
        yield from samples
    except (OSError, EOFError, ValueError, UnicodeError) as exn:
        _warn_once(path, exn)


def _warn_once(path: str, exn: Exception) -> None:
    if path not in _WARNED:  # a broken shard read again and again (every epoch): say it once
        _WARNED.add(path)
        log.warning("shard %s: stopped reading (%s); its remaining samples count as skipped", path, exn)


_WARNED: set[str] = set()


def read_tars(shards: Iterator[dict]) -> Iterator[dict]:
    """Stage: shard descriptors {path, count, start, stop, ...tags} -> raw samples start..stop-1.

    Positions come from the manifest: a shard that ends early or cannot be read is padded with
    `__missing__` samples up to `stop` (they are counted as skipped downstream), extra members past
    the manifest count are ignored. So a sample's position never depends on damage elsewhere."""
    for shard in shards:
        tags = {k: v for k, v in shard.items() if k.startswith("__")}
        samples = _shard_samples(shard["path"])
        position = 0
        for sample in itertools.islice(samples, shard["stop"]):
            if position >= shard["start"]:
                sample.update(tags)
                yield sample
            position += 1
        samples.close()
        for position in range(max(position, shard["start"]), shard["stop"]):
            yield {"__key__": f"{shard['path']}#{position}", "__missing__": True, **tags}


def _image_preference(image_ext: str) -> tuple[str, ...]:
    """Which image member of a sample is read: the manifest's format first, then the other whitelisted ones."""
    return (image_ext,) + tuple(e for e in IMAGE_EXTS if e != image_ext)


class _Decoder:
    """Stage: raw sample -> {image uint8 HxWx3, label, key} using only whitelisted decoders.

    A sample that is missing, has no image, fails to decode or has the wrong shape is dropped and
    counted; each good sample carries the running count and the cursor just past itself."""

    def __init__(self, image_ext: str, size: int, skipped: int, limit: int):
        self.exts = _image_preference(image_ext)
        self.size, self.skipped, self.limit = size, skipped, limit

    def decode(self, sample: dict) -> dict | None:
        if sample.get("__missing__") or sample.get("__bad__"):
            return None
        ext = next((e for e in self.exts if e in sample), None)
        if ext is None:
            return None
        try:
            image = decode_image(sample[ext], ext)
            label = int(sample["cls"].decode("ascii").strip()) if "cls" in sample else -1
        except Exception as exn:  # noqa: BLE001 - any failure of one sample is that sample's problem
            log.debug("sample %s: %r", sample["__key__"], exn)
            return None
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            return None
        return {"image": image, "label": label, "key": sample["__key__"]}

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        bad_in_a_row = 0
        for sample in samples:
            out = self.decode(sample)
            if out is None:
                self.skipped += 1
                bad_in_a_row += 1
                if self.skipped <= 5:
                    log.warning("skipping corrupt or missing sample %s", sample["__key__"])
                if bad_in_a_row >= self.limit:
                    raise RuntimeError(f"{bad_in_a_row} corrupt or missing samples in a row; the shards seem "
                                       f"to hold nothing decodable (run `make verify`)")
                continue
            bad_in_a_row = 0
            out["__cursor__"] = sample.get("__cursor__")
            out["__skipped__"] = self.skipped
            yield out


class _SharedSlots:
    """Batch buffers in shared memory: a ring of `slots` [B,H,W,3] buffers per DataLoader worker.

    Sending a fresh tensor from a worker costs a new shared-memory file per batch (~30 us per
    128-px image here: file, mapping, page faults), as much as all other reading work together.
    Instead a worker writes its j-th batch into slot j % slots of its ring and sends only the slot
    number; the main process copies the batch out (so the consumer owns it) and frees the slot. A
    semaphore per worker counts free slots, so a slot is never overwritten before it was copied."""

    def __init__(self, workers: int, slots: int, batch_shape: tuple[int, ...], context):
        nbytes = workers * slots * math.prod(batch_shape)
        shape = " x ".join(map(str, batch_shape))
        _check_shared_memory(nbytes, f"{workers} workers x {slots} batches of {shape} bytes")
        self.buffers = torch.empty((workers, slots, *batch_shape), dtype=torch.uint8).share_memory_()
        self.free = [context.Semaphore(slots) for _ in range(workers)]
        self.slots = slots
        self.parent = os.getpid()
        self.pool = _BufferPool(batch_shape)

    def __getstate__(self):  # what the workers get: no pool (it lives in the main process)
        return {**self.__dict__, "pool": None}

    def new_batch(self, index: int) -> tuple[tuple[int, int], np.ndarray]:
        """In a worker: the slot for its `index`-th batch -> ((worker, slot), [B,H,W,3] array)."""
        worker, slot = get_worker_info().id, index % self.slots
        while not self.free[worker].acquire(timeout=1.0):
            if os.getppid() != self.parent:  # the main process is gone: nobody will free a slot
                raise SystemExit(0)
        return (worker, slot), self.buffers[worker, slot].numpy()

    @staticmethod
    def finish(handle: tuple[int, int], n: int) -> tuple[int, int]:
        return handle  # the pixels stay in shared memory; the main process gets the slot

    def take(self, worker: int, slot: int, n: int, pin: bool) -> torch.Tensor:
        """In the main process: copy a batch out, free its slot -> uint8 [n,3,H,W] (channels_last)."""
        if pin:  # pinned memory for asynchronous copies to the GPU (CUDA caches these blocks)
            out = torch.empty((n, *self.buffers.shape[3:]), dtype=torch.uint8, pin_memory=True)
            out.copy_(self.buffers[worker, slot, :n])
        else:
            out = self.pool.take(n)
            np.copyto(out.numpy(), self.buffers[worker, slot, :n].numpy())
        self.free[worker].release()
        return out.permute(0, 3, 1, 2)


class _BufferPool:
    """Reusable [B,H,W,3] batch memory for the main process, without a GPU.

    A fresh 3 MiB tensor per batch costs ~10 us per 128-px image in page faults here (glibc hands
    such blocks back to the kernel on free). Each tensor handed out is a view of a pooled numpy
    buffer; torch keeps that numpy view alive exactly as long as any tensor uses the memory, and
    when the last one is gone the buffer returns to the pool. A consumer that keeps batches just
    makes the pool allocate more."""

    def __init__(self, batch_shape: tuple[int, ...]):
        self.batch_shape, self.free = batch_shape, []

    def take(self, n: int) -> torch.Tensor:
        buffer = self.free.pop() if self.free else np.empty(self.batch_shape, dtype=np.uint8)
        view = buffer[:n]
        weakref.finalize(view, self.free.append, buffer)
        return torch.from_numpy(view)

    def new_batch(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        """In-process batching (num_workers=0): the batch is written straight into pooled memory."""
        tensor = self.take(self.batch_shape[0])
        return tensor, tensor.numpy()

    @staticmethod
    def finish(handle: torch.Tensor, n: int) -> torch.Tensor:
        return handle[:n]


def _check_shared_memory(nbytes: int, what: str) -> None:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        def mib(n: int) -> str:
            return f"{n / 2**20:.{0 if n >= 10 * 2**20 else 2}f} MiB"

        raise RuntimeError(
            f"data loading needs {mib(nbytes)} of shared memory ({what}) but /dev/shm has {mib(free)} free; "
            f"give the container more (docker run --shm-size=2g) or lower data.num_workers or "
            f"data.batch_size_per_device")


def batched(samples: Iterator[dict], batch_size: int, worker: int, partial_last: bool,
            out: "_SharedSlots | _BufferPool") -> Iterator[tuple]:
    """Stage: decoded samples -> (pixels, labels, keys, meta), batched on the CPU in the worker.

    Each image is copied into the batch memory as it arrives and then dropped: holding a batch of
    separately allocated images costs ~7 page faults per 128-px image here. pixels: a uint8
    [B,H,W,3] tensor in-process, or in a DataLoader worker the (worker, slot) of the shared buffer
    holding it. Labels travel as a list: a tensor would cost a shared-memory file."""
    for index in itertools.count():
        handle, memory = out.new_batch(index)
        labels, keys, last = [], [], None
        for last in itertools.islice(samples, batch_size):
            memory[len(keys)] = last.pop("image")
            labels.append(last["label"])
            keys.append(last["key"])
        if not keys or (len(keys) < batch_size and not partial_last):
            return
        meta = {"worker": worker, "skipped": last["__skipped__"], "cursor": last["__cursor__"]}
        yield out.finish(handle, len(keys)), labels, keys, meta
        if len(keys) < batch_size:
            return


def _worker_init(worker_id: int) -> None:
    die_with_parent()  # a data worker never outlives the process it reads for


def _load(readers: IterableDataset, num_workers: int, batch_shape: tuple[int, ...]) -> Iterator[tuple]:
    """Run `readers` in the main process (num_workers=0) or in DataLoader workers with shared
    batch slots -> (uint8 [B,3,H,W] channels_last, int64 [B], keys, meta) in the main process.

    [B,H,W,3] is the decoder's layout; permute() shows it as [B,3,H,W] without the copy to
    contiguous NCHW (~60 us per 128-px image). Pinned when CUDA is there, for async copies."""
    if num_workers == 0:
        readers.out = _BufferPool(batch_shape)
        for pixels, labels, keys, meta in readers:
            yield pixels.permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64), keys, meta
        return
    context = multiprocessing.get_context()
    # Slots per worker: PREFETCH_BATCHES waiting, one being handed over, one being filled. Fewer
    # would only make a worker wait: the main process copies each batch out as it receives it.
    slots = _SharedSlots(num_workers, PREFETCH_BATCHES + 2, batch_shape, context)
    readers.out = slots
    pin = torch.cuda.is_available()
    # batch_size=None: the workers batch themselves. In-order delivery is round-robin over the
    # workers (the train stream's per-worker cursors rely on it and check it on every batch).
    # generator: the loader draws its workers' base seed from it, not from the global RNG that drives
    # the training step (a draw there would shift a resumed run's noise). The workers die with us.
    source = iter(DataLoader(readers, batch_size=None, num_workers=num_workers, prefetch_factor=PREFETCH_BATCHES,
                             multiprocessing_context=context, persistent_workers=False,
                             generator=torch.Generator().manual_seed(0), worker_init_fn=_worker_init))
    try:
        for (worker, slot), labels, keys, meta in source:
            yield slots.take(worker, slot, len(keys), pin), torch.tensor(labels, dtype=torch.int64), keys, meta
    finally:
        source._shutdown_workers()  # now, not at garbage collection: an abandoned stream stops its workers


# --------------------------------------------------------------------------------------------
# Training stream
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TrainPlan:
    """Everything that defines one rank's training stream (picklable, sent to the workers)."""

    shards: tuple[tuple[str, int], ...]
    image_ext: str
    size: int
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers: max(1, num_workers)
    batch_size: int
    shuffle_buffer: int  # resampled only
    samples_per_worker_epoch: int  # resampled only


# ---- order "permutation": one global order per epoch, read by position ----------------------

_ROUNDS = 8


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array: every input bit flips about half the output bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)  # uint64 arrays wrap around silently, as wanted
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, *key) -> np.ndarray:
    """A pseudo-random permutation of [0, n), evaluated at `index` (any int array of values in [0, n)).

    A balanced Feistel network on the smallest even number of bits that holds n - 1 (8 rounds, round
    keys from a hash of `key`), with cycle walking: an output outside [0, n) is permuted again
    until it falls inside, which keeps the map a bijection of [0, n). Pure integer arithmetic: no
    table of n entries is built, any position can be asked alone (what a resumed or re-sized run
    needs), and the order is the same on every machine and every numpy version."""
    half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    digest = hashlib.sha256(repr(("permutation", *key)).encode()).digest()
    keys = np.frombuffer(digest, dtype="<u8").astype(np.uint64)
    keys = np.concatenate([keys, _mix64(keys)])[:_ROUNDS]
    out = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(out.shape, dtype=bool)
    while todo.any():
        v = out[todo]
        for k in keys:
            left, right = v >> shift, v & mask
            v = (right << shift) | (left ^ (_mix64(right ^ k) & mask))
        out[todo] = v
        todo = out >= np.uint64(n)
    return out.astype(np.int64)


def epoch_order(positions: np.ndarray, counts: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Global stream positions -> (shard, index in shard) of the samples there.

    The stream is epoch after epoch; epoch e = position // N is a permutation of all N training
    samples, seeded by (seed, e). It depends on nothing else: not the world size, the number of
    workers or the batch size, which is what lets a run continue on another number of processes."""
    n = sum(counts)
    positions = np.asarray(positions, dtype=np.int64)
    epochs, within = positions // n, positions % n
    ids = np.empty_like(positions)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        ids[sel] = permute(within[sel], n, seed, int(epoch))
    offsets = np.cumsum([0, *counts])
    shard = np.searchsorted(offsets, ids, side="right") - 1
    return shard, ids - offsets[shard]


class _RandomAccess:
    """Single samples of a shard set by (shard, index in shard): one pread of the sample's members.

    Each shard is indexed by one pass over its tar headers (data is seeked over), made when the shard
    is first read and kept: per sample its key, where its image and class members lie, and whether a
    member appears twice (~50 bytes a sample). Reading a sample is then one pread of the bytes from
    its first wanted member to its last, with no header parsing. A shard that ends early or breaks
    has fewer entries than its manifest count: the rest are missing. Open files are kept in a small
    LRU, so a set of thousands of shards needs no more descriptors."""

    MAX_OPEN = 64

    def __init__(self, shards: tuple[tuple[str, int], ...], image_ext: str):
        self.shards = shards
        self.image_exts = _image_preference(image_ext)
        self.index: dict[int, tuple[np.ndarray, list[str]]] = {}  # shard -> (entries, keys)
        self.files: dict[int, int] = {}  # shard -> fd, in least-recently-used order

    def _entry(self, members: dict[str, tuple[int, int]], bad: bool) -> tuple[int, ...]:
        """(image offset, image size, image format index, cls offset, cls size, bad); -1 for absent."""
        ext = next((e for e in self.image_exts if e in members), None)
        img = members[ext] if ext else (-1, -1)
        cls = members.get("cls", (-1, -1))
        return (*img, self.image_exts.index(ext) if ext else -1, *cls, int(bad))

    def _index(self, shard: int) -> tuple[np.ndarray, list[str]]:
        if shard not in self.index:
            path, count = self.shards[shard]
            rows, keys = [], []
            key, members, bad = None, {}, False
            try:
                with open(path, "rb", buffering=1 << 16) as f:
                    for k, ext, offset, size, _ in _tar_entries(f, path, frozenset()):
                        if ext not in READ_EXTS:
                            continue
                        if k != key:
                            if key is not None:
                                rows.append(self._entry(members, bad))
                                keys.append(key)
                                if len(rows) == count:
                                    key = None
                                    break  # members past the manifest count are never read
                            key, members, bad = k, {}, False
                        bad = bad or ext in members  # the same member twice: which one is right is unknown
                        members[ext] = (offset, size)
                if key is not None:
                    rows.append(self._entry(members, bad))
                    keys.append(key)
            except (OSError, EOFError, ValueError, UnicodeError) as exn:
                _warn_once(path, exn)  # the sample being indexed when it broke may be incomplete: dropped
            self.index[shard] = (np.array(rows, dtype=np.int64).reshape(-1, 6), keys)
        return self.index[shard]

    def _fd(self, shard: int) -> int:
        fd = self.files.pop(shard, None)
        if fd is None:
            if len(self.files) >= self.MAX_OPEN:
                os.close(self.files.pop(next(iter(self.files))))
            fd = os.open(self.shards[shard][0], os.O_RDONLY)
        self.files[shard] = fd  # most recently used last
        return fd

    def read(self, shard: int, index: int) -> dict:
        """The raw sample {"__key__", "jpg": bytes, "cls": bytes}; `__missing__` when unreadable,
        `__bad__` when a member appears twice."""
        path = self.shards[shard][0]
        entries, keys = self._index(shard)
        if index >= len(entries):
            return {"__key__": f"{path}#{index}", "__missing__": True}
        img_off, img_len, img_ext, cls_off, cls_len, bad = entries[index].tolist()
        sample = {"__key__": keys[index]}
        if bad:
            return {**sample, "__bad__": True}
        parts = {}
        if img_ext >= 0:
            parts[self.image_exts[img_ext]] = (img_off, img_len)
        if cls_off >= 0:
            parts["cls"] = (cls_off, cls_len)
        if not parts:
            return sample
        lo = min(off for off, _ in parts.values())
        hi = max(off + n for off, n in parts.values())
        try:
            data = os.pread(self._fd(shard), hi - lo, lo)
        except OSError as exn:
            _warn_once(path, exn)
            return {**sample, "__missing__": True}
        if len(data) < hi - lo:
            _warn_once(path, EOFError("shorter than when it was indexed"))
            return {**sample, "__missing__": True}
        for ext, (off, n) in parts.items():
            sample[ext] = data[off - lo:off - lo + n]
        return sample

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


def _positions(plan: _TrainPlan, start: int, worker: int) -> Iterator[np.ndarray]:
    """Stage (source): the global positions this (rank, worker) reads, one array per batch.

    Micro-batch m of every rank covers the global positions [start + m*W*B, start + (m+1)*W*B);
    rank r takes its slice [r*B, (r+1)*B) of it, and the DataLoader hands batch m to the consumer
    from worker m % workers (round-robin), so worker w reads micro-batches w, w + workers, ..."""
    per_step = plan.world_size * plan.batch_size
    for m in itertools.count(worker, plan.workers):
        first = start + m * per_step + plan.rank * plan.batch_size
        yield np.arange(first, first + plan.batch_size, dtype=np.int64)


class _ReadByPosition:
    """Stage: global positions -> decoded samples {image, label, key, __skipped__}.

    A sample that is missing or does not decode is replaced by the first good sample after it in the
    global order (position + 1, + 2, ...), so batches keep their size and the replacement, like the
    order, is the same whatever the world size. Replacements are counted (`__skipped__`, a running
    count of this reader) and the first few are logged."""

    def __init__(self, plan: _TrainPlan, limit: int):
        self.plan, self.limit = plan, limit
        self.reader = _RandomAccess(plan.shards, plan.image_ext)
        self.decoder = _Decoder(plan.image_ext, plan.size, 0, limit)
        self.counts = [c for _, c in plan.shards]

    def _at(self, positions: np.ndarray) -> list[dict | None]:
        shards, indexes = epoch_order(positions, self.counts, self.plan.seed)
        return [self.decoder.decode(self.reader.read(int(s), int(i))) for s, i in zip(shards, indexes)]

    def __call__(self, batches: Iterator[np.ndarray]) -> Iterator[dict]:
        skipped = 0
        try:
            for positions in batches:
                for position, out in zip(positions.tolist(), self._at(positions)):
                    if out is None:
                        skipped += 1
                        if skipped <= 5:
                            log.warning("skipping corrupt or missing sample at position %d", position)
                        out = self._replacement(position)
                    out["__skipped__"] = skipped
                    out["__cursor__"] = None
                    yield out
        finally:
            self.reader.close()

    def _replacement(self, position: int) -> dict:
        for probe in range(position + 1, position + self.limit + 1):
            (out,) = self._at(np.array([probe]))
            if out is not None:
                return out
        raise RuntimeError(f"{self.limit} corrupt or missing samples in a row; the shards seem "
                           f"to hold nothing decodable (run `make verify`)")


class _PermutationReaders(IterableDataset):
    """One rank's training stream in the global order; worker w reads micro-batches w, w + workers, ..."""

    def __init__(self, plan: _TrainPlan, start: int):
        self.plan, self.start = plan, start
        self.out: _SharedSlots | _BufferPool | None = None  # batch memory, set by _load

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        p = self.plan
        n = sum(c for _, c in p.shards)
        pipeline = wds.DataPipeline(
            # Positions in the global order that this (rank, worker) reads, batch after batch.
            partial(_positions, p, self.start, worker),
            # Position -> (shard, index) through the epoch's permutation -> one pread of that sample's
            # whitelisted members -> decoded image; a bad sample is replaced by the next good one.
            _ReadByPosition(p, max(MAX_CONSECUTIVE_BAD, n)),
            # Batch on the CPU into uint8 [B,3,H,W]; metadata says which worker made it.
            partial(batched, batch_size=p.batch_size, worker=worker, partial_last=False, out=self.out),
        )
        return iter(pipeline)


# ---- order "resampled": whole shards drawn with replacement, per (rank, worker) --------------


def _epoch_shards(plan: _TrainPlan, worker: int, first_epoch: int) -> Iterator[dict]:
    """Stage (source): worker epoch after worker epoch, whole shards drawn uniformly with replacement.

    A uniform draw of a whole shard gives every sample the same chance, whatever the shard sizes."""
    readable = [(p, c) for p, c in plan.shards if c > 0]
    for epoch in itertools.count(first_epoch):
        rng = _rng("train-shards", plan.seed, plan.rank, worker, epoch)
        drawn, total = [], 0
        while total < plan.samples_per_worker_epoch:
            path, count = rng.choice(readable)
            drawn.append((path, count))
            total += count
        for path, count in drawn:
            yield {"path": path, "count": count, "start": 0, "stop": count,
                   "__epoch__": epoch, "__epoch_len__": total}


def _shuffle_epochs(samples: Iterator[dict], plan: _TrainPlan, worker: int) -> Iterator[dict]:
    """Stage: a shuffle buffer per worker epoch (RNG from seed, rank, worker, epoch), drained at the
    epoch's end, so an epoch's order depends on nothing before it. Tags each output with its cursor."""
    buffer: list[dict] = []
    epoch, rng, index = None, None, 0

    def emit(sample):
        nonlocal index
        index += 1
        done = index == sample["__epoch_len__"]
        sample["__position__"] = (sample["__epoch__"], index - 1)
        sample["__cursor__"] = (sample["__epoch__"] + 1, 0) if done else (sample["__epoch__"], index)
        return sample

    for sample in samples:
        if sample["__epoch__"] != epoch:  # a new worker epoch: drain the previous one first
            if rng is not None:
                rng.shuffle(buffer)
            while buffer:
                yield emit(buffer.pop())
            epoch, rng, index = sample["__epoch__"], _rng("train-shuffle", plan.seed, plan.rank, worker,
                                                          sample["__epoch__"]), 0
        buffer.append(sample)
        if len(buffer) >= plan.shuffle_buffer:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield emit(buffer.pop())


def _skip_before(samples: Iterator[dict], epoch: int, index: int) -> Iterator[dict]:
    """Stage (resume): drop the samples before the cursor, still undecoded."""
    for sample in samples:
        if sample["__position__"] >= (epoch, index):
            yield sample


class _ResampledReaders(IterableDataset):
    """One rank's resampled stream; each DataLoader worker runs the pipeline of one logical worker."""

    def __init__(self, plan: _TrainPlan, offset: int, cursors: list[list[int]]):
        self.plan, self.offset, self.cursors = plan, offset, cursors
        self.out: _SharedSlots | _BufferPool | None = None  # batch memory, set by _load

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.offset) % self.plan.workers
        epoch, index, skipped = self.cursors[worker]
        p = self.plan
        pipeline = wds.DataPipeline(
            # Shards: resampled (with replacement), whole shards per worker epoch, seeded by
            # (seed, rank, worker, epoch). Every (rank, worker) has its own seed, so no node or
            # worker splitting is needed and webdataset's single_node_only check never runs; a
            # resumed worker starts at its cursor's epoch without touching earlier ones.
            partial(_epoch_shards, p, worker, epoch),
            # Tar -> raw samples: only image and cls members are extracted (never .pyd/.pickle);
            # a truncated or unreadable shard is padded to its manifest count with missing samples.
            read_tars,
            # Shuffle buffer per worker epoch, drained at its end; tags every sample with its cursor.
            partial(_shuffle_epochs, plan=p, worker=worker),
            # Resume: skip the samples this worker had already delivered, before any decoding.
            partial(_skip_before, epoch=epoch, index=index),
            # Decode the whitelisted image/cls members; corrupt or missing samples are counted, dropped.
            _Decoder(p.image_ext, p.size, skipped, max(MAX_CONSECUTIVE_BAD, p.samples_per_worker_epoch)),
            # Batch on the CPU into uint8 [B,3,H,W]; metadata says which worker and where it stands.
            partial(batched, batch_size=p.batch_size, worker=worker, partial_last=False, out=self.out),
        )
        return iter(pipeline)


class TrainStream:
    """The infinite, deterministic, exactly resumable training stream of one rank.

    Iterate it for `Batch`es; iterating again continues where the consumer stopped. Save
    `state_dict()` with a checkpoint and call `load_state_dict()` on a fresh stream before iterating.
    Do not wrap it in accelerator.prepare(): it already reads this rank's own part.

    data.order=permutation (default): every epoch is one permutation of all training samples,
    seeded by (train.seed, epoch) and nothing else; each optimizer micro-step the ranks read
    consecutive slices of it. Every sample is read exactly once per epoch whatever the number of
    shards, ranks and workers, and the position in the stream is one number shared by all ranks,
    so a run can continue on another world size, worker count or batch size with nothing repeated
    or skipped. Samples are read by position (an index of each tar's headers, one pread a sample).

    data.order=resampled: each (rank, worker) draws whole shards with replacement and reads them
    sequentially through a shuffle buffer (open_clip's --dataset-resampled), for sets with far more
    shards than readers or on storage where only sequential reads are fast. It resumes exactly with
    the same world size, workers and batch size; with other settings it continues with fresh draws
    (see load_state_dict)."""

    def __init__(self, cfg: Config, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        d = cfg.data
        m = read_manifest(d.shards)
        shards = _shards(d.shards, m, "train")
        self.samples_per_epoch: int = sum(c for _, c in shards)
        if self.samples_per_epoch == 0:
            raise ConfigError(f"{d.shards}/manifest.json lists no training samples; re-run `make shards` "
                              f"with more images or a smaller --val-fraction")
        self.classes: list[str] = list(m["classes"])
        self.image_size: int = int(m["size"])
        self.order = d.order
        self.num_workers = d.num_workers
        workers = max(1, d.num_workers)
        self._plan = _TrainPlan(
            shards=shards, image_ext=m["image_format"], size=self.image_size, seed=cfg.train.seed,
            rank=rank, world_size=world_size, workers=workers, batch_size=d.batch_size_per_device,
            shuffle_buffer=max(1, d.shuffle_buffer_samples),
            samples_per_worker_epoch=math.ceil(self.samples_per_epoch / (world_size * workers)))
        # The identity of the shard set: a position in another set's order means nothing.
        self._shards_id = hashlib.sha256(json.dumps(m["splits"]["train"]["shards"], sort_keys=True)
                                         .encode()).hexdigest()[:16]
        self._seed = cfg.train.seed
        self._position = 0  # global samples consumed by all ranks together
        self._skipped = 0  # corrupt or missing samples this rank met in the batches handed out
        self._batches = 0  # resampled: batches handed out
        self._cursors = [[0, 0, 0] for _ in range(workers)]  # resampled, per logical worker: epoch, index, skipped
        self._iterating = False

    @property
    def skipped_samples(self) -> int:
        """Corrupt or missing samples met so far (this rank), in the batches handed to the consumer."""
        return self._skipped if self.order == "permutation" else sum(c[2] for c in self._cursors)

    @property
    def position(self) -> int:
        """Samples consumed so far by all ranks together (epochs = position / samples_per_epoch)."""
        return self._position

    def __iter__(self) -> Iterator[Batch]:
        if self._iterating:
            raise RuntimeError("this TrainStream is already being iterated; use one iterator at a time "
                               "(a new one continues where the previous one stopped once that is closed)")
        self._iterating = True
        p = self._plan
        if self.order == "permutation":
            readers = _PermutationReaders(p, self._position)
        else:
            readers = _ResampledReaders(p, self._batches % p.workers, [list(c) for c in self._cursors])
        loader = _load(readers, self.num_workers, (p.batch_size, p.size, p.size, 3))
        last_skipped = [0] * p.workers  # per physical worker: its running count of replaced samples
        batches = 0
        try:
            for images, labels, keys, meta in loader:
                self._position += p.world_size * p.batch_size
                if self.order == "permutation":
                    expected = batches % p.workers
                    worker = meta["worker"]
                    self._skipped += meta["skipped"] - last_skipped[worker]
                    last_skipped[worker] = meta["skipped"]
                else:
                    expected = self._batches % p.workers
                    self._cursors[expected] = [*meta["cursor"], meta["skipped"]]
                    self._batches += 1
                if meta["worker"] != expected:
                    raise RuntimeError(f"batch {batches} came from worker {meta['worker']}, expected {expected}: "
                                       f"the DataLoader is not round-robin")
                batches += 1
                yield Batch(images, labels, keys)
        finally:
            loader.close()  # stops the workers now
            self._iterating = False

    def state_dict(self) -> dict:
        """The position after the last batch handed to the consumer, as plain JSON-able data.

        permutation: {"format": 2, "order", "seed", "shards": train shard-list hash, "position",
        "skipped", "world_size", "num_workers", "batch_size"} (the last three for information).
        resampled: the same plus "batches" and "workers": [{"epoch", "index", "skipped"} per
        logical worker], and "shuffle_buffer"."""
        p = self._plan
        state = {"format": STATE_FORMAT, "order": self.order, "seed": self._seed, "shards": self._shards_id,
                 "position": self._position, "skipped": self.skipped_samples, "world_size": p.world_size,
                 "num_workers": self.num_workers, "batch_size": p.batch_size}
        if self.order == "resampled":
            state.update({"rank": p.rank, "shuffle_buffer": p.shuffle_buffer, "draw_seed": p.seed,
                          "batches": self._batches,
                          "workers": [{"epoch": e, "index": i, "skipped": s} for e, i, s in self._cursors]})
        return state

    def load_state_dict(self, state: dict) -> str | None:
        """Continue from `state` (call before iterating). Returns None when the stream continues
        exactly, else one sentence saying how it continues. Refuses (ValueError) a state of another
        shard set, seed or order, or of an older format."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"the data-stream state has format {state.get('format')!r}, this version reads "
                             f"format {STATE_FORMAT}: it was saved by an older version of the pipeline; "
                             f"start the run again with train.resume=never or in a new run folder")
        mine = self.state_dict()
        diff = [f for f in ("order", "seed", "shards") if state.get(f) != mine[f]]
        if diff:
            what = {"order": "data.order", "seed": "train.seed", "shards": "the training shards"}
            raise ValueError(
                "cannot continue the data stream: the checkpoint was saved with "
                + ", ".join(f"{what[f]}={state.get(f)!r}" for f in diff) + " but this run has "
                + ", ".join(f"{what[f]}={mine[f]!r}" for f in diff)
                + "; resume with the same settings, or start over with train.resume=never")
        self._position = int(state["position"])
        self._skipped = int(state["skipped"])
        if self.order == "permutation":
            return None
        same = all(state.get(f) == mine[f] for f in ("rank", "world_size", "num_workers", "batch_size",
                                                       "shuffle_buffer"))
        if same:
            self._plan = dataclasses.replace(self._plan, seed=int(state["draw_seed"]))
            self._batches = int(state["batches"])
            self._cursors = [[int(w["epoch"]), int(w["index"]), int(w["skipped"])] for w in state["workers"]]
            return None
        # Other settings: the per-(rank, worker) draws cannot be continued; draw afresh from a seed
        # that depends on how far the run got, so a resumed run does not replay its first draws.
        self._plan = dataclasses.replace(self._plan, seed=int.from_bytes(hashlib.sha256(
            repr(("resampled-resume", int(state["draw_seed"]), self._position)).encode()).digest()[:4], "little"))
        return ("data.order=resampled continues with fresh shard draws (the world size, workers or batch "
                "size changed), so the sample order differs from an uninterrupted run")


# --------------------------------------------------------------------------------------------
# Validation stream
# --------------------------------------------------------------------------------------------


def val_assignment(counts: list[int], readers: int) -> list[list[tuple[int, int, int]]]:
    """Split the val samples over `readers` readers: reader t gets the global positions
    [t*N/R, (t+1)*N/R) of the concatenated shards, as (shard, start, stop) pieces. Contiguous ranges
    make every sample read once in total (plus skipping at most one shard prefix per reader), and
    work for any number of shards, fewer than readers included (readers then share a shard)."""
    total = sum(counts)
    offsets = list(itertools.accumulate(counts, initial=0))
    out = []
    for t in range(readers):
        lo, hi = t * total // readers, (t + 1) * total // readers
        pieces = []
        for shard, count in enumerate(counts):
            start, stop = max(lo, offsets[shard]), min(hi, offsets[shard] + count)
            if start < stop:
                pieces.append((shard, start - offsets[shard], stop - offsets[shard]))
        out.append(pieces)
    return out


class _ValReaders(IterableDataset):
    def __init__(self, shards, image_ext: str, size: int, rank: int, workers: int, world_size: int,
                 batch_size: int):
        self.shards, self.image_ext, self.size = shards, image_ext, size
        self.rank, self.workers, self.world_size, self.batch_size = rank, workers, world_size, batch_size
        self.out: _SharedSlots | _BufferPool | None = None  # batch memory, set by _load

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        reader = self.rank * self.workers + worker
        pieces = val_assignment([c for _, c in self.shards], self.world_size * self.workers)[reader]
        decoder = _Decoder(self.image_ext, self.size, 0, limit=math.inf)
        pipeline = wds.DataPipeline(
            # Shards: this reader's fixed pieces (shard, start, stop); no randomness, no resampling.
            partial(iter, [{"path": self.shards[s][0], "count": self.shards[s][1], "start": a, "stop": b}
                           for s, a, b in pieces]),
            # Tar -> raw samples in [start, stop), whitelisted members only, padded where a shard is short.
            read_tars,
            # Decode whitelisted members; corrupt or missing samples are dropped and counted.
            decoder,
            # Batch on the CPU; the last batch of each reader may be short.
            partial(batched, batch_size=self.batch_size, worker=worker, partial_last=True, out=self.out),
        )
        yield from pipeline
        if decoder.skipped:
            log.warning("validation reader %d skipped %d corrupt or missing samples", reader, decoder.skipped)


def val_batches(cfg: Config, rank: int, world_size: int, num_workers: int | None = None,
                split: str = "val") -> Iterator[Batch]:
    """The whole split (val by default; "train" for evaluation and encoding of the train set), each
    sample exactly once over all ranks x workers, in a fixed order.

    Ranks may get different numbers of batches (and a rank may get none): accumulate metrics
    locally and reduce once after the loop; never run a collective per batch, it would hang."""
    d = cfg.data
    m = read_manifest(d.shards)
    workers = d.num_workers if num_workers is None else num_workers
    readers = _ValReaders(_shards(d.shards, m, split), m["image_format"], int(m["size"]), rank,
                          max(1, workers), world_size, d.val_batch_size_per_device)
    shape = (d.val_batch_size_per_device, int(m["size"]), int(m["size"]), 3)
    loader = _load(readers, workers, shape)
    try:
        for images, labels, keys, _ in loader:
            yield Batch(images, labels, keys)
    finally:
        loader.close()  # stops the workers now, also when the consumer breaks out early


# --------------------------------------------------------------------------------------------
# On the device
# --------------------------------------------------------------------------------------------


class DeviceAugment(nn.Module):
    """uint8 [B,3,H,W] on the device -> float in the model's output range, augmented when training.

    kornia draws its parameters with torch's global RNG of the images' device, the RNG that
    Accelerate saves and restores with a checkpoint, so augmentation replays exactly on resume."""

    def __init__(self, cfg: DataConfig, output_range: tuple[float, float]):
        super().__init__()
        import kornia.augmentation as K  # imported here: workers and readers never need kornia

        augs: list[nn.Module] = []
        if cfg.hflip:
            augs.append(K.RandomHorizontalFlip(p=0.5))
        if cfg.rotation_degrees > 0:
            augs.append(K.RandomRotation(degrees=cfg.rotation_degrees, p=1.0))  # corners fill with black
        self.augment = nn.Sequential(*augs)
        self.low, self.high = float(output_range[0]), float(output_range[1])

    def forward(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = images.float() / 255.0  # [0, 1]; kornia works on floats
        if train and len(self.augment):
            for aug in self.augment:  # sample on the images' device (also without a .to(device))
                if aug.device != x.device:
                    aug.set_rng_device_and_dtype(x.device, x.dtype)
            x = self.augment(x)
        return x * (self.high - self.low) + self.low
