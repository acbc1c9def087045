"""The reader (the pipeline/data package): real shards on disk, real webdataset, real DataLoader workers.

Specification:
- the val stream gives every val sample exactly once over ranks x workers, also with fewer shards
  than readers;
- the train stream gives correctly shaped uint8 batches whose labels match the source classes;
- order "permutation": each epoch is one permutation of all training samples, the same whatever the
  world size, workers and batch size; every sample is read exactly once per epoch; a run continues
  from a JSON state exactly, also on another world size; order "resampled" resumes exactly;
- corrupt samples and truncated shards are skipped and counted; pickles are never unpickled;
- every shard is checked against its manifest entry before reading (size; sha256 when asked, before or
  while training) and must lie in the shards folder; a damaged one stops, is skipped or is read by
  choice; read-time warnings name the shard file and byte offset;
- handing a batch to the consumer starts no thread pool in the main process (whose idle threads
  would spin between batches: CPU that grows with the machine's cores, not with the images).
"""

from __future__ import annotations

import builtins
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.config import Config, ConfigError, DataConfig, TrainConfig
from pipeline.data import (READ_EXTS, Batch, DeviceAugment, TrainStream, epoch_order, permute, read_manifest,
                           read_tars, val_assignment, val_batches)
from pipeline.data.tar import _tar_members
from pipeline.errors import UserError
from pipeline.images import encode_image
from pipeline.shards import write_shards

SIZE = 16
PERMUTATION_10 = [2, 8, 5, 6, 1, 3, 4, 0, 9, 7]  # permute(range(10), 10, 0, 0), pinned when it was written
CLASSES = ["daisy", "rose", "tulip"]
# Each class has its own colour, so a test can check a label against the pixels it came with.
PALETTE = np.array([[230, 230, 40], [220, 30, 60], [40, 90, 220]], dtype=np.int16)


# --------------------------------------------------------------------------------------------
# Fixtures: real shards from pipeline.shards.write_shards; hand-built ones (wds.TarWriter, the
# on-disk format of CONTRACTS.md) for damage and hostile members the writer never produces
# --------------------------------------------------------------------------------------------


def _image(cls: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(-12, 13, size=(SIZE, SIZE, 3))
    return np.clip(PALETTE[cls] + noise, 0, 255).astype(np.uint8)


def _sample(cls: int, seed: int, extra: dict | None = None) -> dict:
    data = encode_image(_image(cls, seed), "jpg", 95)
    key = hashlib.sha256(data).hexdigest()[:16]
    meta = {"path": f"{CLASSES[cls]}/{seed}.png", "class": CLASSES[cls], "width": SIZE, "height": SIZE}
    return {"__key__": key, "jpg": data, "cls": str(cls).encode(), "json": json.dumps(meta).encode(),
            **(extra or {})}


def write_shard_set(root: Path, train: list[list[dict]], val: list[list[dict]]) -> Path:
    """Write train-/val-NNNNNN.tar and manifest.json (issue 2 schema) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, shards in (("train", train), ("val", val)):
        entries, per_class = [], {c: 0 for c in CLASSES}
        for i, samples in enumerate(shards):
            path = root / f"{split}-{i:06d}.tar"
            with wds.TarWriter(str(path), encoder=False) as writer:
                for s in samples:
                    writer.write(s)
                    per_class[CLASSES[int(s["cls"])]] += 1
            data = path.read_bytes()
            entries.append({"file": path.name, "count": len(samples), "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
        splits[split] = {"count": sum(e["count"] for e in entries), "per_class": per_class, "shards": entries}
    manifest = {"format": 1, "name": root.name, "size": SIZE, "image_format": "jpg", "classes": CLASSES,
                "splits": splits, "skipped": [], "duplicates": [], "options": {}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def make_samples(n: int, start: int) -> list[dict]:
    return [_sample(i % len(CLASSES), start + i) for i in range(n)]


def cfg_for(shards: Path, num_workers: int = 0, batch_size: int = 4, seed: int = 0, buffer: int = 8,
            val_batch_size: int = 3, order: str = "permutation", on_damaged: str = "stop",
            verify: str = "size") -> Config:
    return Config(data=DataConfig(shards=str(shards), batch_size_per_device=batch_size,
                                  val_batch_size_per_device=val_batch_size, num_workers=num_workers,
                                  shuffle_buffer_samples=buffer, order=order, on_damaged_shard=on_damaged,
                                  verify_shards=verify),
                  train=TrainConfig(seed=seed))


def _write_source_folder(root: Path, per_class: int) -> Path:
    """An image folder in the Kaggle layout: one subfolder per class, PNGs of assorted sizes."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = 16 + 4 * (i % 3), 16 + 2 * (i % 4)
            image = np.resize(_image(c, 10_000 * c + i), (h, w, 3))
            encode = encode_image(image, "png")
            (root / name / f"{name}_{i:03d}.png").write_bytes(encode)
    return root


def _json_by_key(shards: Path, split: str) -> dict[str, dict]:
    """key -> its json metadata, read with Python's tarfile (independently of the reader under test)."""
    out = {}
    for tar_path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    out[member.name.split(".", 1)[0]] = json.loads(tar.extractfile(member).read())
    return out


def _corrupt_first_image(tar_path: Path) -> str:
    """Overwrite the start of the first image member in place (bit rot: the tar stays valid)."""
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    with open(tar_path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"this is not a jpeg")
    return member.name.split(".", 1)[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """60 images of 3 classes through pipeline.shards.write_shards at 16 px, 8 samples per shard;
    one train sample is then corrupted in place."""
    tmp = tmp_path_factory.mktemp("data")
    src = _write_source_folder(tmp / "images", per_class=20)
    manifest = write_shards(src, tmp / "shards", "toy", SIZE, val_fraction=0.25, workers=1,
                            max_samples_per_shard=8, progress=False, log=lambda line: None)
    root = tmp / "shards" / "toy"
    assert manifest["classes"] == CLASSES and len(manifest["splits"]["val"]["shards"]) >= 2
    train, val = _json_by_key(root, "train"), _json_by_key(root, "val")
    classes = {key: CLASSES.index(meta["path"].split("/")[0]) for key, meta in {**train, **val}.items()}
    return {"dir": root, "manifest": manifest, "classes": classes, "val_keys": sorted(val),
            "corrupt": _corrupt_first_image(root / "train-000001.tar")}


def take(stream, n: int) -> list[Batch]:
    return list(itertools.islice(iter(stream), n))


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(x.keys == y.keys and torch.equal(x.images, y.images)
                                    and torch.equal(x.labels, y.labels) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------
# Validation: each sample exactly once over ranks x workers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("counts, readers", [
    ([7, 4], 4), ([10], 4), ([3], 8), ([5, 5, 5, 5, 5], 2), ([0, 6, 0, 1], 3), ([], 2), ([2, 1], 1),
])
def test_val_assignment_covers_every_position_once(counts, readers):
    pieces = val_assignment(counts, readers)
    assert len(pieces) == readers
    seen = [(shard, i) for reader in pieces for shard, a, b in reader for i in range(a, b)]
    assert sorted(seen) == [(s, i) for s, c in enumerate(counts) for i in range(c)]
    sizes = [sum(b - a for _, a, b in reader) for reader in pieces]
    assert max(sizes, default=0) - min(sizes, default=0) <= 1  # balanced


def _val_keys_over(cfg: Config, world_size: int, workers: int) -> list[str]:
    keys = []
    for rank in range(world_size):
        for batch in val_batches(cfg, rank=rank, world_size=world_size, num_workers=workers):
            assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, SIZE, SIZE)
            keys += batch.keys
    return keys


def test_val_round_trip_two_ranks_two_workers(dataset):
    cfg = cfg_for(dataset["dir"])
    keys = _val_keys_over(cfg, world_size=2, workers=2)
    assert sorted(keys) == dataset["val_keys"]  # every key, none twice
    assert len(keys) == dataset["manifest"]["splits"]["val"]["count"] > 60 * 0.25 / 2
    assert keys == _val_keys_over(cfg, world_size=2, workers=2)  # deterministic, order included


def test_val_round_trip_with_fewer_shards_than_readers(tmp_path):
    src = _write_source_folder(tmp_path / "images", per_class=5)
    write_shards(src, tmp_path / "shards", "one", SIZE, val_fraction=0.5, workers=1, progress=False,
                 log=lambda line: None)  # one val shard of ~7 samples for up to 6 readers
    root = tmp_path / "shards" / "one"
    assert len(read_manifest(root)["splits"]["val"]["shards"]) == 1
    for world_size, workers in ((2, 2), (3, 2), (4, 2), (1, 0)):  # (4, 2): some readers get nothing
        keys = _val_keys_over(cfg_for(root), world_size, workers)
        assert sorted(keys) == sorted(_json_by_key(root, "val")), (world_size, workers)


def test_split_argument_reads_the_train_split_each_sample_once(tmp_path):
    src = _write_source_folder(tmp_path / "images", per_class=5)
    write_shards(src, tmp_path / "shards", "both", SIZE, val_fraction=0.5, workers=1, progress=False,
                 max_samples_per_shard=3, log=lambda line: None)
    root = tmp_path / "shards" / "both"
    keys = [k for rank in range(2) for b in val_batches(cfg_for(root), rank, 2, num_workers=2, split="train")
            for k in b.keys]
    assert sorted(keys) == sorted(_json_by_key(root, "train"))
    assert not set(keys) & set(_json_by_key(root, "val"))


# --------------------------------------------------------------------------------------------
# Training: shapes, ranges, labels
# --------------------------------------------------------------------------------------------


def test_train_batches_have_shape_range_and_matching_labels(dataset):
    stream = TrainStream(cfg_for(dataset["dir"], num_workers=2, batch_size=5), rank=0, world_size=1)
    assert stream.samples_per_epoch == dataset["manifest"]["splits"]["train"]["count"]
    assert stream.classes == CLASSES
    augment = DeviceAugment(DataConfig(hflip=True, rotation_degrees=10.0), output_range=(-1.0, 1.0))
    for batch in take(stream, 12):
        assert batch.images.dtype == torch.uint8 and batch.images.shape == (5, 3, SIZE, SIZE)
        assert batch.labels.dtype == torch.int64
        assert dataset["corrupt"] not in batch.keys
        assert batch.labels.tolist() == [dataset["classes"][k] for k in batch.keys]
        # The pixels carry their class colour: the label really belongs to the image.
        means = batch.images.float().mean(dim=(2, 3))
        nearest = torch.cdist(means, torch.tensor(PALETTE, dtype=torch.float32)).argmin(dim=1)
        assert torch.equal(nearest, batch.labels)
        x = augment(batch.images, train=True)
        assert x.dtype == torch.float32 and x.shape == batch.images.shape
        assert -1.0 <= x.min() and x.max() <= 1.0


def test_device_augment_scaling_and_global_rng():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    images[0] = 0
    images[1] = 255
    for low, high in ((-1.0, 1.0), (0.0, 1.0)):
        out = DeviceAugment(DataConfig(hflip=True), (low, high))(images, train=False)
        assert torch.allclose(out, images.float() / 255 * (high - low) + low)
        assert out[0].eq(low).all() and out[1].eq(high).all()
    rotating = DeviceAugment(DataConfig(hflip=True, rotation_degrees=15.0), (0.0, 1.0))
    torch.manual_seed(3)
    a = rotating(images, train=True)
    torch.manual_seed(3)
    assert torch.equal(a, rotating(images, train=True))  # the global RNG (Accelerate checkpoints it)
    assert not torch.equal(a, rotating(images, train=True))  # ... and it moves on
    augment = DeviceAugment(DataConfig(hflip=True), (0.0, 1.0))
    torch.manual_seed(3)
    a = augment(images, train=True)
    plain = images.float() / 255
    flipped = [torch.equal(a[i], plain[i].flip(-1)) and not torch.equal(a[i], plain[i]) for i in range(64)]
    unchanged = [torch.equal(a[i], plain[i]) for i in range(64)]
    assert all(f or u for f, u in zip(flipped, unchanged)) and 10 < sum(flipped) < 54


def test_device_augment_flips_then_rotates_as_kornia_does():
    """The flip and the rotation are one affine warp: each image equals kornia's rotate (align_corners=True,
    positive angles counter-clockwise) of the image flipped or not, with the draws read back from the same
    global RNG (the flips first, then the angles); non-square images rotate without shear."""
    import kornia

    images = torch.randint(0, 256, (6, 3, 16, 20), dtype=torch.uint8)
    augment = DeviceAugment(DataConfig(hflip=True, rotation_degrees=30.0), (0.0, 1.0))
    torch.manual_seed(1)
    out = augment(images, train=True)
    torch.manual_seed(1)
    flip = torch.rand(6) < 0.5
    angle = (torch.rand(6) * 2 - 1) * 30.0
    x = images.float() / 255
    expected = kornia.geometry.transform.rotate(torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x), angle,
                                                align_corners=True)
    assert 0 < flip.sum() < 6 and torch.allclose(out, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Determinism and exact resume
# --------------------------------------------------------------------------------------------


def test_stream_is_a_function_of_seed_and_rank(dataset, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # webdataset's default node splitter would raise here

    def first(seed=0, rank=0):
        return take(TrainStream(cfg_for(dataset["dir"], seed=seed), rank=rank, world_size=2), 6)

    reference = first()
    assert same(reference, first())
    assert [b.keys for b in first(rank=1)] != [b.keys for b in reference]
    assert [b.keys for b in first(seed=1)] != [b.keys for b in reference]


@pytest.mark.parametrize("order", ["permutation", "resampled"])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("k, where", [(3, "inside"), (17, "across")])
def test_exact_resume_from_json_state(dataset, order, num_workers, k, where):
    m = 6
    cfg = cfg_for(dataset["dir"], num_workers=num_workers, batch_size=4, order=order)
    uninterrupted = TrainStream(cfg, rank=0, world_size=1)
    batches, state = [], None
    for batch in uninterrupted:  # workers keep prefetching past k: the state must ignore that
        batches.append(batch)
        if len(batches) == k:
            state = json.loads(json.dumps(uninterrupted.state_dict()))
        if len(batches) == k + m:
            break
    if order == "permutation":
        assert state["position"] == 4 * k
        assert (state["position"] < uninterrupted.samples_per_epoch) == (where == "inside")
    else:
        epochs = [w["epoch"] for w in state["workers"]]
        assert (max(epochs) == 0) if where == "inside" else (min(epochs) >= 1), state
        assert sum(w["skipped"] for w in state["workers"]) >= 1  # the corrupt sample lies before the cut

    resumed = TrainStream(cfg, rank=0, world_size=1)
    assert resumed.load_state_dict(state) is None  # continues exactly
    assert same(take(resumed, m), batches[k:])
    assert resumed.skipped_samples == uninterrupted.skipped_samples
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_iterating_again_continues_where_the_consumer_stopped(dataset):
    cfg = cfg_for(dataset["dir"], num_workers=2, batch_size=3)
    reference = take(TrainStream(cfg, rank=0, world_size=1), 9)
    stream = TrainStream(cfg, rank=0, world_size=1)
    assert same(take(stream, 5) + take(stream, 4), reference)
    assert multiprocessing.active_children() == []  # an abandoned iteration stops its workers
    first = iter(stream)
    next(first)
    with pytest.raises(RuntimeError, match="already being iterated"):
        next(iter(stream))


def test_too_little_shared_memory_is_one_sentence(dataset, monkeypatch):
    real = os.statvfs

    def tiny(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, 4096, 1, 1, 1, *tuple(st)[5:]))  # 4 KiB free

    monkeypatch.setattr(os, "statvfs", tiny)
    stream = TrainStream(cfg_for(dataset["dir"], num_workers=2), rank=0, world_size=1)
    expected = r"needs 0.02 MiB of shared memory \(2 workers x 4 batches .* has 0.00 MiB free; give the container more"
    with pytest.raises(RuntimeError, match=expected):
        take(stream, 1)


def test_resume_refuses_a_state_from_another_order_seed_or_shard_set(dataset, tmp_path):
    state = TrainStream(cfg_for(dataset["dir"], num_workers=2), rank=1, world_size=2).state_dict()
    for cfg, message in [(cfg_for(dataset["dir"], seed=1), "train.seed=0 but this run has train.seed=1"),
                         (cfg_for(dataset["dir"], order="resampled"), "data.order='permutation' but this run has"),
                         (cfg_for(write_shard_set(tmp_path / "other", [make_samples(5, 0)], [make_samples(2, 9)])),
                          "the training shards=")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainStream(cfg, rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="saved by an older version"):
        TrainStream(cfg_for(dataset["dir"]), rank=0, world_size=1).load_state_dict({**state, "format": 1})


def test_resampled_resume_on_other_settings_draws_afresh_and_says_so(dataset):
    cfg = cfg_for(dataset["dir"], order="resampled")
    stream = TrainStream(cfg, rank=0, world_size=2)
    reference = take(stream, 3)
    state = stream.state_dict()
    other = TrainStream(cfg, rank=0, world_size=1)
    note = other.load_state_dict(state)
    assert note and "fresh shard draws" in note
    assert other.position == state["position"]
    assert [b.keys for b in take(other, 3)] != [b.keys for b in reference]


# --------------------------------------------------------------------------------------------
# Order "permutation": one global order per epoch, whatever the world size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1000, 4097])
def test_permute_is_a_bijection_that_depends_on_its_key(n):
    index = np.arange(n)
    a = permute(index, n, 0, 0)
    assert sorted(a.tolist()) == list(range(n))
    assert np.array_equal(permute(index[::-1], n, 0, 0), a[::-1])  # any position can be asked alone
    if n >= 100:
        b = permute(index, n, 0, 1)
        assert sorted(b.tolist()) == list(range(n))
        assert (a == b).mean() < 0.05 and (a == index).mean() < 0.05  # another key: another order
        # well mixed: neighbours in the order are not neighbours in the data
        assert np.abs(np.diff(a)).mean() > n / 5


def test_permute_is_stable_across_versions():
    # The order is part of every checkpoint's meaning (a position in it): it must never change.
    assert permute(np.arange(10), 10, 0, 0).tolist() == PERMUTATION_10


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean set of 23 training samples in shards of uneven sizes (7, 1, 9, 6), 3 val samples."""
    root = tmp_path_factory.mktemp("clean")
    train = [make_samples(7, 0), make_samples(1, 100), make_samples(9, 200), make_samples(6, 300)]
    write_shard_set(root / "set", train, [make_samples(3, 900)])
    keys = [s["__key__"] for shard in train for s in shard]
    return {"dir": root / "set", "keys": keys}


def global_order(shards: Path, world_size: int, workers: int, batch_size: int, steps: int,
                 state: dict | None = None) -> tuple[list[str], dict]:
    """The keys every rank reads in `steps` micro-steps, concatenated rank by rank within each step
    (the global order as the ranks see it), and rank 0's state afterwards."""
    per_rank = []
    for rank in range(world_size):
        stream = TrainStream(cfg_for(shards, num_workers=workers, batch_size=batch_size), rank, world_size)
        if state is not None:
            stream.load_state_dict(state)
        per_rank.append([b.keys for b in take(stream, steps)])
        if rank == 0:
            end = stream.state_dict()
    order = [k for step in range(steps) for rank in range(world_size) for k in per_rank[rank][step]]
    return order, end


@pytest.mark.parametrize("world_size, workers, batch_size", [(1, 0, 4), (1, 2, 5), (2, 1, 3), (3, 2, 2), (5, 0, 1)])
def test_every_sample_exactly_once_per_epoch_in_one_order_for_any_world_size(clean, world_size, workers, batch_size):
    n = len(clean["keys"])
    steps = -(-3 * n // (world_size * batch_size))  # three epochs or a little more
    order, state = global_order(clean["dir"], world_size, workers, batch_size, steps)
    for epoch in range(3):
        assert sorted(order[epoch * n:(epoch + 1) * n]) == sorted(clean["keys"]), f"epoch {epoch}"
    assert order[:n] != order[n:2 * n]  # each epoch is shuffled afresh
    assert state["position"] == steps * world_size * batch_size
    reference, _ = global_order(clean["dir"], 1, 0, 7, -(-len(order) // 7))
    assert order == reference[:len(order)]  # the same order, however it is read


def test_resume_on_another_world_size_continues_the_global_order(clean):
    """8 ranks x 2 -> 3 ranks x 2 -> 1 rank x 5 (a job requeued onto fewer nodes): nothing repeated or skipped."""
    first, state = global_order(clean["dir"], 4, 2, 2, 2)  # 16 samples: part of epoch 0
    second, state = global_order(clean["dir"], 3, 1, 2, 3, state=state)  # 18 more, across the epoch boundary
    third, state = global_order(clean["dir"], 1, 0, 5, 4, state=state)
    reference, _ = global_order(clean["dir"], 1, 0, 1, len(first + second + third))
    assert first + second + third == reference
    assert state["position"] == 16 + 18 + 20


# --------------------------------------------------------------------------------------------
# Damage and hostile content
# --------------------------------------------------------------------------------------------


def _truncate_inside_sample(path: Path, index: int) -> None:
    """Cut `path` in the middle of the image member of sample `index`."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    image = next(m for m in members if m.name == f"{keys[index]}.jpg")
    path.write_bytes(path.read_bytes()[: image.offset_data + image.size // 2])


def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(tmp_path):
    val = [make_samples(6, 0), make_samples(8, 100)]
    val[0][2] = {**val[0][2], "jpg": b"not an image"}
    train = [make_samples(6, 200), make_samples(8, 300)]
    train[0][1] = {**train[0][1], "jpg": val[0][2]["jpg"]}
    root = write_shard_set(tmp_path / "bad", train, val)
    _truncate_inside_sample(root / "val-000001.tar", 5)  # samples 0..4 survive, 5..7 are lost
    _truncate_inside_sample(root / "train-000001.tar", 3)

    # read_tars keeps positions: 8 slots, the 3 lost ones marked missing.
    slots = list(read_tars(iter([{"path": str(root / "val-000001.tar"), "count": 8, "start": 0, "stop": 8}])))
    assert [bool(s.get("__missing__")) for s in slots] == [False] * 5 + [True] * 3

    good_val = [s["__key__"] for s in val[0] if s is not val[0][2]] + [s["__key__"] for s in val[1][:5]]
    # (the cut shards fail the start-up size check: on_damaged_shard=read reads what they still hold)
    assert sorted(_val_keys_over(cfg_for(root, on_damaged="read"), world_size=2, workers=2)) == sorted(good_val)

    counts = [6, 8]
    good_train = {s["__key__"] for s in train[0] if s is not train[0][1]} | {s["__key__"] for s in train[1][:3]}
    for order in ("permutation", "resampled"):
        stream = TrainStream(cfg_for(root, num_workers=0, batch_size=4, order=order, on_damaged="read"), rank=0,
                             world_size=1)
        keys = [k for batch in take(stream, 20) for k in batch.keys]
        assert len(keys) == 80 and set(keys) <= good_train
        if order == "permutation":
            # Known answer: a bad position is one whose sample (through the epoch's permutation) is
            # shard 0's sample 1 or shard 1's samples 3..7; each is replaced by the next good one.
            shards, index = epoch_order(np.arange(80), counts, 0)
            bad = ((shards == 0) & (index == 1)) | ((shards == 1) & (index >= 3))
            assert stream.skipped_samples == int(bad.sum()) and bad[:70].sum() == 5 * 6  # 6 per epoch of 14
        else:
            # Every shard holds a bad sample and 80 good samples span several worker epochs of ~14 slots.
            assert stream.skipped_samples >= 5


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_agrees_with_tarfile(tmp_path, fmt):
    """The lean tar reader sees what Python's tarfile sees: long names (pax / GNU headers), folders,
    meta files and upper-case extensions, and only the whitelisted members."""
    deep = "d" * 60 + "/" + "e" * 50  # > 100 characters with the file name: needs a long-name header
    names = {f"{deep}/k1.jpg": b"a" * 700, f"{deep}/k1.cls": b"1", "k2.JPG": b"b" * 512, "k2.json": b"{}",
             "k2.pyd": b"pickle!", "__meta__.jpg": b"m", "k3.seg.png": b"c" * 3}
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("somedir/"))  # not a regular file
        for name, data in names.items():
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100:
                name = name[-99:].lstrip("/")  # ustar splits long names into prefix + name
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = list(_tar_members(str(path), READ_EXTS))
    expected = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            folder, _, base = m.name.rpartition("/")
            stem, _, ext = base.partition(".")
            if m.isreg() and not stem.startswith("__") and ext.lower() in READ_EXTS:
                expected.append((f"{folder}/{stem}" if folder else stem, ext.lower(), tar.extractfile(m).read()))
    assert got == expected
    assert [ext for _, ext, _ in got] == ["jpg", "cls", "jpg"]  # no json, pyd, or multi-dot png


def test_a_corrupt_tar_header_stops_the_shard_and_counts_the_rest(tmp_path):
    root = write_shard_set(tmp_path / "hdr", [make_samples(3, 0)], [make_samples(6, 10)])
    path = root / "val-000000.tar"
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][3]
    data = bytearray(path.read_bytes())
    data[member.offset + 130] ^= 0x01  # one flipped bit in the size field of sample 3's header
    path.write_bytes(bytes(data))
    slots = list(read_tars(iter([{"path": str(path), "count": 6, "start": 0, "stop": 6}])))
    assert [bool(s.get("__missing__")) for s in slots] == [False] * 3 + [True] * 3


def test_pickle_members_are_never_unpickled(tmp_path):
    class Payload:
        def __init__(self, marker: Path):
            self.marker = marker

        def __reduce__(self):  # unpickling runs exec(...), which creates the marker file
            return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)

    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists()  # the payload is live: unpickling it does create a file

    marker = tmp_path / "pwned"
    evil = pickle.dumps(Payload(marker))
    train = [[_sample(i % 3, i, {"pyd": evil, "pickle": evil}) for i in range(6)]]
    val = [[_sample(i % 3, 50 + i, {"pyd": evil}) for i in range(5)]]
    root = write_shard_set(tmp_path / "evil", train, val)
    with tarfile.open(root / "train-000000.tar") as tar:
        assert any(name.endswith(".pyd") for name in tar.getnames())

    keys = [k for b in take(TrainStream(cfg_for(root, num_workers=2), rank=0, world_size=1), 4) for k in b.keys]
    assert len(keys) == 16
    assert len(_val_keys_over(cfg_for(root), world_size=1, workers=2)) == 5
    assert not marker.exists()


def test_read_manifest_errors_are_one_sentence(tmp_path, dataset):
    with pytest.raises(ConfigError, match="has no manifest.json; build it with `make shards"):
        read_manifest(tmp_path / "nothing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        read_manifest(broken)
    gone = tmp_path / "gone"
    gone.mkdir()
    manifest = json.loads((dataset["dir"] / "manifest.json").read_text())
    (gone / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"train-000000.tar listed in .* is missing; re-run `make shards"):
        read_manifest(gone)
    assert read_manifest(dataset["dir"])["splits"]["val"]["count"] == len(dataset["val_keys"])


def test_batches_kept_by_the_consumer_are_never_overwritten(clean):
    """Workers write batches into a ring of shared-memory slots and the main process lends a slot to
    the consumer instead of copying it. A consumer that keeps every batch (here 3 epochs' worth, far
    more than the ring) must still see each batch's own pixels: the same as read in-process."""
    import threading

    n = len(clean["keys"])
    kept: list[Batch] = []
    stream = TrainStream(cfg_for(clean["dir"], num_workers=2, batch_size=4), 0, 1)
    reader = threading.Thread(target=lambda: kept.extend(take(stream, 3 * n // 4)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "a worker starved of free slots: the stream hangs"
    reference = take(TrainStream(cfg_for(clean["dir"], num_workers=0, batch_size=4), 0, 1), 3 * n // 4)
    assert [b.keys for b in kept] == [b.keys for b in reference]
    for got, want in zip(kept, reference):
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)


# --------------------------------------------------------------------------------------------
# data.decode: cpu | gpu | auto (nvJPEG in the training process; this machine has no GPU)
# --------------------------------------------------------------------------------------------


def _with_decode(cfg: Config, decode: str) -> Config:
    cfg.data.decode = decode
    return cfg


def test_decode_gpu_without_cuda_is_one_sentence_and_auto_falls_back(dataset):
    from pipeline.config import validate
    from pipeline.data.gpu_decode import decode_device

    assert not torch.cuda.is_available()  # the CPU machines these tests run on
    with pytest.raises(ConfigError) as e:
        TrainStream(_with_decode(cfg_for(dataset["dir"]), "gpu"), rank=0, world_size=1)
    assert str(e.value) == ("data.decode=gpu cannot be used: this machine has no CUDA device "
                            "(torch.cuda.is_available() is False); set data.decode=cpu, or auto to fall back to "
                            "the CPU where the GPU cannot decode")
    with pytest.raises(ConfigError, match=r"the shards store png images and only JPEG is decoded on the GPU"):
        decode_device("gpu", "png")
    assert decode_device("auto", "jpg") is None and decode_device("cpu", "jpg") is None
    auto = take(TrainStream(_with_decode(cfg_for(dataset["dir"], num_workers=2), "auto"), 0, 1), 5)
    cpu = take(TrainStream(cfg_for(dataset["dir"], num_workers=2), 0, 1), 5)
    assert same(auto, cpu)
    with pytest.raises(ConfigError, match=r"data.decode is 'nvjpeg' but must be one of cpu, gpu, auto"):
        validate(_with_decode(cfg_for(dataset["dir"]), "nvjpeg"), check_paths=False)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("order", ["permutation", "resampled"])
def test_bytes_path_decoded_in_the_main_process_equals_decoding_in_the_workers(dataset, num_workers, order):
    """data.decode=gpu's plumbing, with the batch decoded by torchvision on the CPU instead of the GPU
    (the same libjpeg-turbo as Pillow here: the same pixels): workers hand on bytes, a sample whose
    header is broken is replaced exactly as when the workers decode (the dataset has one)."""
    import dataclasses

    cfg = cfg_for(dataset["dir"], num_workers=num_workers, batch_size=5, order=order)
    workers_decode = TrainStream(cfg, 0, 1)
    reference = take(workers_decode, 12)
    stream = TrainStream(cfg, 0, 1)
    stream._decode_on = "cpu"  # what decode_device returns on a GPU machine is "cuda"
    stream._plan = dataclasses.replace(stream._plan, keep_bytes=True)
    got = take(stream, 12)
    assert [b.keys for b in got] == [b.keys for b in reference]
    assert all(torch.equal(g.images, r.images) and torch.equal(g.labels, r.labels) for g, r in zip(got, reference))
    assert stream.skipped_samples == workers_decode.skipped_samples
    assert order == "resampled" or stream.skipped_samples > 0  # 60 samples: a whole epoch, the corrupt one in it


# --------------------------------------------------------------------------------------------
# Shards checked against the manifest at start; names that stay in the folder; warnings that say where
# --------------------------------------------------------------------------------------------


def _three_shards(root: Path) -> Path:
    return write_shard_set(root, [make_samples(6, 0), make_samples(8, 100), make_samples(7, 200)],
                           [make_samples(4, 300)])


def test_a_replaced_shard_stops_at_start_in_one_sentence_or_is_skipped_and_named(tmp_path, caplog):
    """`cp train-000000.tar train-000001.tar` used to train silently, reading shard 0 twice an epoch."""
    root = _three_shards(tmp_path / "set")
    (root / "train-000001.tar").write_bytes((root / "train-000000.tar").read_bytes())
    with pytest.raises(UserError, match=r"^shard .*/train-000001.tar has \d+ bytes, the manifest says \d+: it was "
                                          r"replaced or damaged .* data.on_damaged_shard=skip"):
        TrainStream(cfg_for(root), rank=0, world_size=1)

    stream = TrainStream(cfg_for(root, on_damaged="skip"), rank=0, world_size=1)
    said = [r.getMessage() for r in caplog.records if "on_damaged_shard" in r.getMessage()]
    assert len(said) == 1 and "leaving out 1 damaged train shard(s) of 3 (8 of 21 samples)" in said[0]
    assert "train-000001.tar has" in said[0]
    assert stream.samples_per_epoch == 13  # shards 0 and 2: each of their samples once per epoch
    keys = [k for b in take(stream, 13 * 2 // 4) for k in b.keys]
    lost = {s["__key__"] for s in make_samples(8, 100)}
    assert not lost & set(keys) and len(set(keys)) == 13


def test_damage_of_the_same_size_is_found_by_sha256_when_asked(tmp_path):
    root = _three_shards(tmp_path / "set")
    _corrupt_first_image(root / "train-000002.tar")  # bit rot: same size, the tar still valid
    TrainStream(cfg_for(root), rank=0, world_size=1)  # the size check cannot see it
    with pytest.raises(UserError, match=r"train-000002.tar does not match the sha256 the manifest lists"):
        TrainStream(cfg_for(root, verify="sha256"), rank=0, world_size=1)
    (root / "val-000000.tar").write_bytes(b"")  # validation shards are checked the same way
    with pytest.raises(UserError, match=r"val-000000.tar has 0 bytes, the manifest says"):
        list(val_batches(cfg_for(root), rank=0, world_size=1))


@pytest.mark.parametrize("name", ["../elsewhere.tar", "ABSOLUTE"])
def test_a_manifest_cannot_point_a_shard_outside_its_folder(tmp_path, name):
    root = _three_shards(tmp_path / "set")
    outside = tmp_path / "elsewhere.tar"
    outside.write_bytes((root / "train-000000.tar").read_bytes())  # a readable tar: today it is read
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = str(outside) if name == "ABSOLUTE" else name
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"manifest.json \(train shard\) names .*elsewhere.tar', which is outside"):
        read_manifest(root)


@pytest.mark.parametrize("order", ["permutation", "resampled"])
def test_read_time_warnings_name_the_shard_file_and_offset(dataset, caplog, order):
    stream = TrainStream(cfg_for(dataset["dir"], order=order), rank=0, world_size=1)
    take(stream, 30)
    said = [r.getMessage() for r in caplog.records if "skipping corrupt" in r.getMessage()]
    assert said and re.search(dataset["corrupt"] + r" in .*/train-000001\.tar at byte \d+", said[0]), said


def test_background_sha256_stops_the_stream_at_the_next_batch(tmp_path):
    root = _three_shards(tmp_path / "set")
    _corrupt_first_image(root / "train-000001.tar")  # same size: only a hash sees it
    stream = TrainStream(cfg_for(root, verify="background"), rank=0, world_size=1)  # starts at once
    stream._background.thread.join(timeout=30)  # (the hashing is done; a run would meet it a few batches on)
    with pytest.raises(UserError, match=r"train-000001.tar does not match the sha256 .*\(found by "
                                          r"data.verify_shards=background while training"):
        take(stream, 1)
    clean = TrainStream(cfg_for(_three_shards(tmp_path / "clean"), verify="background"), rank=0, world_size=1)
    clean._background.thread.join(timeout=30)
    assert len(take(clean, 8)) == 8 and clean._background.problem is None
    assert TrainStream(cfg_for(root, verify="background"), rank=1, world_size=2)._background is None  # main only


# --------------------------------------------------------------------------------------------
# The hand-over in the main process: no thread pool (CPU that would not scale with the images)
# --------------------------------------------------------------------------------------------

_HAND_OVER = """
import json, os, sys, threading, time
import torch

# An intra-op pool of one thread per CPU (as torch makes by default; at most 4): OpenMP spins only
# where a process has no more threads than CPUs (16 on the 16-core node, 2 here).
torch.set_num_threads(min(4, len(os.sched_getaffinity(0))))
empty = torch.empty
torch.cuda.is_available = lambda: True  # the hand-over of a CUDA machine (each batch copied to pinned memory) ...
torch.empty = lambda *a, pin_memory=False, **k: empty(*a, **k)  # ... into ordinary memory: no GPU to page-lock it
from pipeline.config import Config, DataConfig, TrainConfig
from pipeline.data import TrainStream


def native_ticks():  # CPU clock ticks of each thread that Python did not start (an intra-op pool's)
    python = {t.native_id for t in threading.enumerate()}  # this one and the DataLoader's queue feeders
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        if int(tid) not in python:
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


cfg = Config(data=DataConfig(shards=sys.argv[1], batch_size_per_device=64, num_workers=2, decode="cpu"),
             train=TrainConfig(seed=0))
batches = iter(TrainStream(cfg, 0, 1))
shapes = [tuple(next(batches).images.shape) for _ in range(2)]  # start-up: the slots are made
before = native_ticks()
for _ in range(8):
    shapes.append(tuple(next(batches).images.shape))
    time.sleep(0.05)  # the consumer's step: the time in which an idle pool would spin
after = native_ticks()
print(json.dumps({"shapes": shapes, "threads": len(after),
                  "ticks": sum(t - before.get(tid, 0) for tid, t in after.items()),
                  "tick_ms": 1000 / os.sysconf("SC_CLK_TCK")}))
batches.close()
"""


@pytest.mark.slow  # seconds: in make test, not in make test-fast
def test_handing_batches_over_runs_no_thread_pool_in_the_main_process(dataset):
    """On a CUDA machine the main process copies each batch out of its shared-memory slot into pinned
    memory. A torch copy_ of a batch runs on every intra-op thread (one per core: 16 on the GPU node),
    and OpenMP's idle threads spin-wait ~10 ms after each copy before they sleep: with a batch every few
    ms, 15 cores spun there and the 12 data workers got what was left (issue 19: 2,046 CPU us per image,
    22 % of raw decode). The hand-over must run on the consumer's thread alone. In a fresh process with
    an intra-op thread per CPU and batches of 64 (large enough for torch to split a copy), the threads
    Python did not start (a pool made once at start-up, if any) get no CPU at all while 8 batches are
    handed over, each followed by a 50 ms pause of the consumer: a sleeping thread is charged no tick."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: torch makes no intra-op pool, so there is nothing that could spin")
    run = subprocess.run([sys.executable, "-c", _HAND_OVER, str(dataset["dir"])], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["shapes"] == [[64, 3, SIZE, SIZE]] * 10  # the CUDA path was taken and delivered
    assert got["ticks"] == 0, (f"{got['threads']} threads other than the consumer's ran for "
                               f"{got['ticks'] * got['tick_ms']:.0f} ms over 8 batches handed over: a torch op "
                               f"on each batch wakes the intra-op pool, which then spins")
