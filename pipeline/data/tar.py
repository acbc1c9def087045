"""Reading tar shards: a lean header parser, sequential reading of samples, and random access to
single samples through an index of each tar's headers (data.order=permutation)."""

from __future__ import annotations

import itertools
import logging
import os
import zlib
from typing import Iterator

import numpy as np

from pipeline.data.decode import image_preference
from pipeline.data.manifest import IMAGE_EXTS

log = logging.getLogger(__name__)

READ_EXTS = frozenset(IMAGE_EXTS + ("cls",))
"""Tar members the streams extract at all. `json` is whitelisted too but no batch needs it, so it is
not even read; anything else (`.pyd`, `.pickle`, ...) is never read, let alone decoded."""


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
                raise EOFError(f"truncated tar header at byte {offset} of {path}")
            return  # a tar cut at a member boundary: the manifest count notices what is missing
        if header[0] == 0 and header.count(0) == 512:
            return  # end-of-archive blocks
        # The header checksum is the byte sum with the checksum field read as spaces; zlib's
        # adler32 gives that sum mod 65521 in C (a Python sum() would cost ~6 us a header).
        stored = _octal(header[148:156]) - 256 + sum(header[148:156])
        if zlib.adler32(header) & 0xFFFF != (1 + stored) % 65521:
            raise ValueError(f"corrupt tar header (bad checksum) at byte {offset} of {path}")
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
                raise EOFError(f"truncated tar member {name} at byte {offset - padded} of {path}")
            f.seek(padded - size, 1)
        else:
            f.seek(padded, 1)
        yield (f"{folder}/{stem}" if folder else stem), ext, offset - padded, size, data


def _tar_members(path: str, wanted: frozenset[str]) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of the tar's regular members whose extension is in `wanted`, in order.
    Members not wanted are seeked over, never read."""
    for key, ext, data, _ in _tar_members_at(path, wanted):
        yield key, ext, data


def _tar_members_at(path: str, wanted: frozenset[str]) -> Iterator[tuple[str, str, bytes, int]]:
    """As _tar_members, with the byte offset of each member's data in the file (for warnings)."""
    with open(path, "rb", buffering=1 << 20) as f:
        for key, ext, offset, _, data in _tar_entries(f, path, wanted):
            if data is not None:
                yield key, ext, data, offset


def _group_samples(members: Iterator[tuple[str, str, bytes]]) -> Iterator[dict]:
    """Consecutive members sharing a key -> one sample dict {"__key__", ext: bytes, ...}; a member
    that appears twice in one sample marks it `__bad__` (which copy is right is unknown)."""
    sample: dict | None = None
    for key, ext, data, *offset in members:  # (an offset, when given, is where the sample starts)
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, **({"__offset__": offset[0]} if offset else {})}
        if ext in sample:
            sample["__bad__"] = True
        sample[ext] = data
    if sample is not None:
        yield sample


def _shard_samples(path: str) -> Iterator[dict]:
    """The samples of one tar (consecutive members sharing a key), whitelisted members only.

    Stops quietly (logged) on a broken tar; the sample being assembled when it breaks is dropped,
    as its members may be incomplete."""
    samples = _group_samples(_tar_members_at(path, READ_EXTS))
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
        tags = {**{k: v for k, v in shard.items() if k.startswith("__")}, "__shard__": shard["path"]}
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


class RandomAccess:
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
        self.image_exts = image_preference(image_ext)
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

    def where(self, shard: int, index: int) -> str:
        """The shard file and byte offset of a sample (indexed already), for a warning."""
        path = self.shards[shard][0]
        entries, keys = self.index.get(shard, (np.zeros((0, 6), np.int64), []))
        if index >= len(entries):
            return f"{path}#{index} (missing: the shard ends before it or could not be read)"
        offsets = [o for o in (int(entries[index][0]), int(entries[index][3])) if o >= 0]  # image, cls data
        return f"{keys[index]} in {path}" + (f" at byte {min(offsets)}" if offsets else "")

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
