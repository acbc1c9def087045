"""The shard set's manifest.json: what a shard folder holds, checked before anything reads it."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ConfigError

IMAGE_EXTS = ("jpg", "png", "webp", "npy")
"""Image member extensions the reader decodes (the only ones pipeline.shards writes)."""


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
