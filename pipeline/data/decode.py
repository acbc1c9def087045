"""Decoding raw samples: whitelisted members only, corrupt samples dropped and counted."""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from pipeline.arrays import decode_sample
from pipeline.data.gpu_decode import jpeg_header_ok
from pipeline.data.manifest import IMAGE_EXTS
from pipeline.images import decode_image

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 10_000
"""A reader that meets this many corrupt samples in a row (and at least a whole worker epoch) stops
with an error instead of spinning forever on a dataset with nothing decodable."""


def image_preference(image_ext: str) -> tuple[str, ...]:
    """Which image member of a sample is read: the manifest's format first, then the other whitelisted ones."""
    return (image_ext,) + tuple(e for e in IMAGE_EXTS if e != image_ext)


def where(sample: dict) -> str:
    """Where a raw sample came from, for a warning: its key, shard file and byte offset."""
    shard = sample.get("__shard__")
    if sample.get("__missing__"):
        return f"{sample['__key__']} (missing: {shard or 'its shard'} ends before it or could not be read)"
    at = f" at byte {sample['__offset__']}" if "__offset__" in sample else ""
    return f"{sample['__key__']} in {shard}{at}" if shard else sample["__key__"]


class SampleDecoder:
    """Stage: raw sample -> {image uint8 HxWx3, label, key} using only whitelisted decoders.

    A sample that is missing, has no image, fails to decode or has the wrong shape is dropped and
    counted; each good sample carries the running count and the cursor just past itself."""

    def __init__(self, image_ext: str, size: int, skipped: int, limit: int, keep_bytes: bool = False,
                 sample_shape: tuple[int, ...] = ()):
        self.sample_shape = tuple(sample_shape)  # array shards: float32 [C, *spatial] .npy members, never unpickled
        self.exts = ("npy",) if self.sample_shape else image_preference(image_ext)
        self.size, self.skipped, self.limit = size, skipped, limit
        self.keep_bytes = keep_bytes  # data.decode=gpu: pass the JPEG's bytes on, its header checked

    def decode(self, sample: dict) -> dict | None:
        if sample.get("__missing__") or sample.get("__bad__"):
            return None
        ext = next((e for e in self.exts if e in sample), None)
        if ext is None:
            return None
        try:
            label = int(sample["cls"].decode("ascii").strip()) if "cls" in sample else -1
            if self.keep_bytes:  # decoded on the GPU in the training process: check the header only
                ok = ext == "jpg" and jpeg_header_ok(sample[ext], self.size)
                return {"image": sample[ext], "label": label, "key": sample["__key__"]} if ok else None
            if self.sample_shape:  # checked dtype and shape; NaN/inf were refused when sharding
                return {"image": decode_sample(sample[ext], self.sample_shape), "label": label, "key": sample["__key__"]}
            image = decode_image(sample[ext], ext)
        except Exception as exn:  # noqa: BLE001 - any failure of one sample is that sample's problem
            log.debug("sample %s: %r", where(sample), exn)
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
                    log.warning("skipping corrupt or missing sample %s", where(sample))
                if bad_in_a_row >= self.limit:
                    raise RuntimeError(f"{bad_in_a_row} corrupt or missing samples in a row; the shards seem "
                                       f"to hold nothing decodable (run `make verify`)")
                continue
            bad_in_a_row = 0
            out["__cursor__"] = sample.get("__cursor__")
            out["__skipped__"] = self.skipped
            yield out
