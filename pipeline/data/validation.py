"""The validation reader: the whole split, each sample exactly once over ranks x workers."""

from __future__ import annotations

import itertools
import logging
import math
from functools import partial
from typing import Iterator

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.config import Config
from pipeline.data.decode import SampleDecoder
from pipeline.data.manifest import batch_layout, checked_shards, read_manifest, sample_shape
from pipeline.data.tar import read_tars
from pipeline.data.transport import Batch, BufferPool, SharedSlots, batched, load_batches

log = logging.getLogger(__name__)


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
                 batch_size: int, sample_shape: tuple[int, ...] = ()):
        self.shards, self.image_ext, self.size, self.sample_shape = shards, image_ext, size, sample_shape
        self.rank, self.workers, self.world_size, self.batch_size = rank, workers, world_size, batch_size
        self.out: SharedSlots | BufferPool | None = None  # batch memory, set by load_batches

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        reader = self.rank * self.workers + worker
        pieces = val_assignment([c for _, c in self.shards], self.world_size * self.workers)[reader]
        decoder = SampleDecoder(self.image_ext, self.size, 0, limit=math.inf, sample_shape=self.sample_shape)
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
    readers = _ValReaders(checked_shards(d.shards, m, split, d.verify_shards, d.on_damaged_shard), m["image_format"], int(m["size"]), rank,
                          max(1, workers), world_size, d.val_batch_size_per_device, sample_shape(m))
    shape, dtype = batch_layout(m, d.val_batch_size_per_device)
    loader = load_batches(readers, workers, shape, dtype=dtype)
    try:
        for images, labels, keys, _ in loader:
            yield Batch(images, labels, keys)
    finally:
        loader.close()  # stops the workers now, also when the consumer breaks out early
