"""From the DataLoader workers to the consumer: batching on the CPU, reused shared-memory batch
slots, pooled batch memory in the main process, and the DataLoader that runs the readers."""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.runs import die_with_parent

PREFETCH_BATCHES = 2
"""Batches each DataLoader worker may have ready ahead of the consumer."""


@dataclass
class Batch:
    images: torch.Tensor
    """uint8 [B, 3, H, W] on the CPU, in channels_last memory (the decoder's HxWx3 layout; call
    .contiguous() for NCHW memory); pinned when CUDA is available. Array shards (model.spatial_dims
    1 or 3): float32 [B, C, L] or [B, C, D, H, W] in the data's own units (DeviceAugment normalises)."""
    labels: torch.Tensor
    """int64 [B]; -1 where the dataset has no classes."""
    keys: list[str]
    """The samples' `__key__`s (stable content hashes)."""

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking), self.keys)


class SharedSlots:
    """Batch buffers in shared memory: a ring of `slots` [B,H,W,3] buffers per DataLoader worker.

    Sending a fresh tensor from a worker costs a new shared-memory file per batch (~30 us per
    128-px image here: file, mapping, page faults), as much as all other reading work together.
    Instead a worker writes each batch into a free slot of its ring and sends only the slot number.
    The main process lends the slot itself to the consumer (no copy: the slot is free again when the
    last tensor using it is gone), as long as the consumer holds no other lent slot of that worker;
    otherwise it copies the batch out and frees the slot at once. So a consumer that keeps batches
    never starves a worker: PREFETCH_BATCHES slots in flight + one being filled + one lent = the ring.
    A semaphore per worker counts its free slots and a shared flag per slot says which are free, so a
    slot is never overwritten while a batch in it is waiting or lent."""

    LENT_PER_WORKER = 1

    def __init__(self, workers: int, slots: int, batch_shape: tuple[int, ...], context, dtype=np.uint8):
        nbytes = workers * slots * math.prod(batch_shape) * np.dtype(dtype).itemsize
        shape = " x ".join(map(str, batch_shape))
        unit = "bytes" if np.dtype(dtype) == np.uint8 else np.dtype(dtype).name
        _check_shared_memory(nbytes, f"{workers} workers x {slots} batches of {shape} {unit}")
        self.buffers = torch.from_numpy(np.empty((workers, slots, *batch_shape), dtype=dtype)).share_memory_()
        self.free = [context.Semaphore(slots) for _ in range(workers)]
        self.is_free = context.Array("b", [1] * (workers * slots), lock=False)  # written before free[w] moves
        self.slots = slots
        self.parent = os.getpid()
        self.pool = BufferPool(batch_shape, dtype)
        self.lent = [0] * workers  # main process: slots of each worker the consumer holds

    def __getstate__(self):  # what the workers get: no pool (it lives in the main process)
        return {**self.__dict__, "pool": None}

    def new_batch(self, index: int) -> tuple[tuple[int, int], np.ndarray]:
        """In a worker: a free slot for its next batch -> ((worker, slot), [B,H,W,3] array)."""
        worker = get_worker_info().id
        while not self.free[worker].acquire(timeout=1.0):
            if os.getppid() != self.parent:  # the main process is gone: nobody will free a slot
                raise SystemExit(0)
        base = worker * self.slots
        # The semaphore says one is free; start looking at the ring position, so slots rotate.
        slot = next(s % self.slots for s in range(index, index + self.slots) if self.is_free[base + s % self.slots])
        self.is_free[base + slot] = 0
        return (worker, slot), self.buffers[worker, slot].numpy()

    @staticmethod
    def finish(handle: tuple[int, int], n: int) -> tuple[int, int]:
        return handle  # the pixels stay in shared memory; the main process gets the slot

    def _release(self, worker: int, slot: int) -> None:
        self.is_free[worker * self.slots + slot] = 1
        self.free[worker].release()

    def _returned(self, worker: int, slot: int) -> None:
        self.lent[worker] -= 1
        self._release(worker, slot)

    def take(self, worker: int, slot: int, n: int, pin: bool) -> torch.Tensor:
        """In the main process: the batch in a slot -> uint8 [n,3,H,W] (channels_last), lent or copied."""
        if not pin and self.lent[worker] < self.LENT_PER_WORKER:
            # Lend the slot: torch keeps this numpy view alive as long as any tensor uses the memory.
            view = self.buffers[worker, slot, :n].numpy()
            self.lent[worker] += 1
            weakref.finalize(view, self._returned, worker, slot).atexit = False
            return _as_batch(torch.from_numpy(view))
        if pin:  # pinned memory for asynchronous copies to the GPU (CUDA caches these blocks)
            out = torch.empty((n, *self.buffers.shape[3:]), dtype=self.buffers.dtype, pin_memory=True)
        else:
            out = self.pool.take(n)
        # numpy's copy, on this thread alone. torch's copy_ would split a batch over every intra-op
        # thread (one per core), whose OpenMP threads then spin ~10 ms before they sleep: with a batch
        # every few ms, 15 cores of a 16-core node spun here while the workers waited for a core.
        np.copyto(out.numpy(), self.buffers[worker, slot, :n].numpy())
        self._release(worker, slot)
        return _as_batch(out)


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    """Batch memory as the consumer sees it: images [B,H,W,3] shown as [B,3,H,W] (no copy); arrays
    (float32 [B, C, *spatial]) as they are."""
    return t.permute(0, 3, 1, 2) if t.dtype == torch.uint8 else t


class BufferPool:
    """Reusable [B,H,W,3] batch memory for the main process, without a GPU.

    A fresh 3 MiB tensor per batch costs ~10 us per 128-px image in page faults here (glibc hands
    such blocks back to the kernel on free). Each tensor handed out is a view of a pooled numpy
    buffer; torch keeps that numpy view alive exactly as long as any tensor uses the memory, and
    when the last one is gone the buffer returns to the pool. A consumer that keeps batches just
    makes the pool allocate more."""

    def __init__(self, batch_shape: tuple[int, ...], dtype=np.uint8):
        self.batch_shape, self.dtype, self.free = batch_shape, dtype, []

    def take(self, n: int) -> torch.Tensor:
        buffer = self.free.pop() if self.free else np.empty(self.batch_shape, dtype=self.dtype)
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
            out: "SharedSlots | BufferPool") -> Iterator[tuple]:
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


class _ByteLists:
    """data.decode=gpu: batches of the samples' JPEG bytes (a list each), sent through the DataLoader's
    own queue; the training process decodes them on the device."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def new_batch(self, index: int) -> tuple[list, list]:
        blobs = [None] * self.batch_size
        return blobs, blobs

    @staticmethod
    def finish(handle: list, n: int) -> list:
        return handle[:n]


def load_batches(readers: IterableDataset, num_workers: int, batch_shape: tuple[int, ...],
          decode_on: str | None = None, dtype=np.uint8) -> Iterator[tuple]:
    """Run `readers` in the main process (num_workers=0) or in DataLoader workers with shared
    batch slots -> (uint8 [B,3,H,W] channels_last, int64 [B], keys, meta) in the main process.

    [B,H,W,3] is the decoder's layout; permute() shows it as [B,3,H,W] without the copy to
    contiguous NCHW (~60 us per 128-px image). Pinned when CUDA is there, for async copies.
    decode_on (data.decode=gpu): the readers hand on JPEG bytes and each batch is decoded on that
    device here -> uint8 [B,3,H,W] on the device.
    dtype float32 (array shards): batch_shape is [B, C, *spatial] and batches come as they are."""
    if decode_on is not None:
        from pipeline.data.gpu_decode import decode_batch

        readers.out = _ByteLists(batch_shape[0])
        source = readers if num_workers == 0 else _loader(readers, num_workers, multiprocessing.get_context())
        try:
            for blobs, labels, keys, meta in source:
                yield decode_batch(blobs, decode_on, keys), torch.tensor(labels, dtype=torch.int64), keys, meta
        finally:
            if num_workers:
                source._shutdown_workers()
        return
    if num_workers == 0:
        readers.out = BufferPool(batch_shape, dtype)
        for pixels, labels, keys, meta in readers:
            yield _as_batch(pixels), torch.tensor(labels, dtype=torch.int64), keys, meta
        return
    context = multiprocessing.get_context()
    # Slots per worker: at most PREFETCH_BATCHES filled or being filled (the DataLoader's outstanding
    # requests), one lent to the consumer, one spare. Fewer would make a worker wait for the consumer.
    slots = SharedSlots(num_workers, PREFETCH_BATCHES + 2, batch_shape, context, dtype)
    readers.out = slots
    pin = torch.cuda.is_available()
    source = _loader(readers, num_workers, context)
    try:
        for (worker, slot), labels, keys, meta in source:
            yield slots.take(worker, slot, len(keys), pin), torch.tensor(labels, dtype=torch.int64), keys, meta
    finally:
        source._shutdown_workers()  # now, not at garbage collection: an abandoned stream stops its workers


def _loader(readers: IterableDataset, num_workers: int, context):
    # batch_size=None: the workers batch themselves. In-order delivery is round-robin over the
    # workers (the train stream's per-worker cursors rely on it and check it on every batch).
    # generator: the loader draws its workers' base seed from it, not from the global RNG that drives
    # the training step (a draw there would shift a resumed run's noise). The workers die with us.
    return iter(DataLoader(readers, batch_size=None, num_workers=num_workers, prefetch_factor=PREFETCH_BATCHES,
                           multiprocessing_context=context, persistent_workers=False,
                           generator=torch.Generator().manual_seed(0), worker_init_fn=_worker_init))
