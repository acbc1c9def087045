"""The training stream of one rank: `TrainStream`, in data.order=permutation or resampled.
(The exact-resume contract is described in pipeline/data/__init__.py.)"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.data.decode import MAX_CONSECUTIVE_BAD, SampleDecoder
from pipeline.data.gpu_decode import decode_device
from pipeline.data.manifest import BackgroundCheck, batch_layout, checked_shards, read_manifest, sample_shape
from pipeline.data.order import epoch_order, seeded_rng
from pipeline.data.tar import RandomAccess, read_tars
from pipeline.data.transport import Batch, BufferPool, SharedSlots, batched, load_batches

log = logging.getLogger(__name__)

STATE_FORMAT = 2
LOCATE_BATCHES = 16
"""data.order=permutation: batches whose sample locations are computed together (speed only)."""


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
    keep_bytes: bool = False  # data.decode=gpu: workers hand on JPEG bytes, decoded in the training process
    sample_shape: tuple[int, ...] = ()  # array shards: float32 [C, *spatial] per sample; empty for images


# ---- order "permutation": one global order per epoch, read by position ----------------------


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
        self.reader = RandomAccess(plan.shards, plan.image_ext)
        self.decoder = SampleDecoder(plan.image_ext, plan.size, 0, limit, plan.keep_bytes, plan.sample_shape)
        self.counts = [c for _, c in plan.shards]

    def _locate(self, positions: np.ndarray) -> list[tuple[int, int]]:
        shards, indexes = epoch_order(positions, self.counts, self.plan.seed)
        return list(zip(shards.tolist(), indexes.tolist()))

    def _at(self, shard: int, index: int) -> dict | None:
        return self.decoder.decode(self.reader.read(shard, index))

    def __call__(self, batches: Iterator[np.ndarray]) -> Iterator[dict]:
        skipped = 0
        try:
            while True:
                # The order of LOCATE_BATCHES batches at once: the permutation is numpy work whose cost
                # is per call (~14 us a sample when called per batch of 64, under 1 us this way).
                # Samples are still read and decoded one at a time, as the batching stage takes them.
                chunk = list(itertools.islice(batches, LOCATE_BATCHES))
                if not chunk:
                    return
                positions = np.concatenate(chunk)
                for position, (shard, index) in zip(positions.tolist(), self._locate(positions)):
                    out = self._at(shard, index)
                    if out is None:
                        skipped += 1
                        if skipped <= 5:
                            log.warning("skipping corrupt or missing sample at position %d: %s", position,
                                        self.reader.where(shard, index))
                        out = self._replacement(position)
                    out["__skipped__"] = skipped
                    out["__cursor__"] = None
                    yield out
        finally:
            self.reader.close()

    def _replacement(self, position: int) -> dict:
        for probe in range(position + 1, position + self.limit + 1):
            out = self._at(*self._locate(np.array([probe]))[0])
            if out is not None:
                return out
        raise RuntimeError(f"{self.limit} corrupt or missing samples in a row; the shards seem "
                           f"to hold nothing decodable (run `make verify`)")


class _PermutationReaders(IterableDataset):
    """One rank's training stream in the global order; worker w reads micro-batches w, w + workers, ..."""

    def __init__(self, plan: _TrainPlan, start: int):
        self.plan, self.start = plan, start
        self.out: SharedSlots | BufferPool | None = None  # batch memory, set by load_batches

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
        rng = seeded_rng("train-shards", plan.seed, plan.rank, worker, epoch)
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
            epoch, rng, index = sample["__epoch__"], seeded_rng("train-shuffle", plan.seed, plan.rank, worker,
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
        self.out: SharedSlots | BufferPool | None = None  # batch memory, set by load_batches

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
            SampleDecoder(p.image_ext, p.size, skipped, max(MAX_CONSECUTIVE_BAD, p.samples_per_worker_epoch),
                     p.keep_bytes, p.sample_shape),
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
        shards = checked_shards(d.shards, m, "train", d.verify_shards, d.on_damaged_shard)
        self.samples_per_epoch: int = sum(c for _, c in shards)
        if self.samples_per_epoch == 0:
            raise UserError(f"{d.shards}/manifest.json lists no training samples; re-run `make shards` "
                              f"with more images or a smaller --val-fraction")
        self.classes: list[str] = list(m["classes"])
        self.image_size: int = int(m["size"])
        self.order = d.order
        self.num_workers = d.num_workers
        workers = max(1, d.num_workers)
        self._decode_on = decode_device(d.decode, m["image_format"])  # None: the workers decode on the CPU
        self._plan = _TrainPlan(
            shards=shards, image_ext=m["image_format"], size=self.image_size, seed=cfg.train.seed,
            rank=rank, world_size=world_size, workers=workers, batch_size=d.batch_size_per_device,
            shuffle_buffer=max(1, d.shuffle_buffer_samples),
            samples_per_worker_epoch=math.ceil(self.samples_per_epoch / (world_size * workers)),
            keep_bytes=self._decode_on is not None, sample_shape=sample_shape(m))
        self._layout = batch_layout(m, d.batch_size_per_device)
        # The identity of the shard set: a position in another set's order means nothing.
        self._shards_id = hashlib.sha256(json.dumps(m["splits"]["train"]["shards"], sort_keys=True)
                                         .encode()).hexdigest()[:16]
        self._seed = cfg.train.seed
        self._position = 0  # global samples consumed by all ranks together
        self._skipped = 0  # corrupt or missing samples this rank met in the batches handed out
        self._batches = 0  # resampled: batches handed out
        self._cursors = [[0, 0, 0] for _ in range(workers)]  # resampled, per logical worker: epoch, index, skipped
        self._iterating = False
        self._background: BackgroundCheck | None = None
        if d.verify_shards == "background" and rank == 0:  # the main process re-hashes the shards it kept
            kept = {path for path, _ in shards}
            entries = [(Path(d.shards) / s["file"], s) for s in m["splits"]["train"]["shards"]]
            self._background = BackgroundCheck([(path, s) for path, s in entries if str(path) in kept])

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
        loader = load_batches(readers, self.num_workers, self._layout[0], self._decode_on, self._layout[1])
        last_skipped = [0] * p.workers  # per physical worker: its running count of replaced samples
        batches = 0
        try:
            for images, labels, keys, meta in loader:
                if self._background is not None:
                    self._background.raise_if_damaged()
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
