"""Files that survive a crash: every file a run keeps is written here, whole or not at all.

    durable.write_json(run_dir / "summary.json", summary, indent=2)
    durable.write_text(run_dir / "config.yaml", text)
    durable.write_with(path, lambda tmp: image.save(tmp, format="PNG"))   # a library that writes a path
    durable.fsync_path(folder)                                           # after renaming into `folder`

Each write goes to a temporary file beside the target, which is fsynced, renamed over the target
(atomic on POSIX) and then the folder is fsynced so the rename itself is on disk. A crash or a full
disk at any moment leaves the previous file or the new one, never a torn mix; the temporary file is
removed when the write fails.

A failure to write (ENOSPC, EDQUOT, EROFS, EIO, ...) raises `ConfigError` with one sentence naming the
file and the reason: the CLIs print it and exit non-zero, like any other problem the user must fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from pipeline.config import ConfigError


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's entries to disk (a folder: the names in it, e.g. after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (shards, latent shards, checkpoint files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def temp_for(path: Path) -> Path:
    """The temporary name a write of `path` uses: hidden, beside it, unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_with(path: str | Path, write: Callable[[Path], Any], tmp: Path | None = None,
               errors: tuple[type[BaseException], ...] = ()) -> Path:
    """`write(tmp)` fills a temporary file (a library that wants a path: safetensors, PIL, np.save);
    it is then fsynced and renamed over `path`, and the folder fsynced. `errors`: further exception
    types that mean "could not write" (e.g. SafetensorError, which carries ENOSPC as text)."""
    path = Path(path)
    tmp = tmp or temp_for(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except (OSError, *errors) as e:
        raise write_error(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_bytes(path: str | Path, data: bytes, tmp: Path | None = None) -> Path:
    def write(t: Path) -> None:
        with open(t, "wb") as f:
            f.write(data)

    return write_with(path, write, tmp)


def write_text(path: str | Path, text: str, tmp: Path | None = None) -> Path:
    return write_bytes(path, text.encode("utf-8"), tmp)


def write_json(path: str | Path, data: Any, tmp: Path | None = None, **dumps: Any) -> Path:
    """JSON of `data` (json.dumps keyword arguments in `dumps`: indent, sort_keys, ...)."""
    return write_text(path, json.dumps(data, **dumps), tmp)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log-like file (metrics.jsonl, starts.jsonl) and fsync it. An append is not
    atomic: a crash can leave the last line torn, which the readers of those files skip."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(Path(path), e) from None


def write_error(path: Path, e: BaseException) -> ConfigError:
    """One sentence for a failed write, naming the file and why (a full disk said as such)."""
    if isinstance(e, OSError) and e.errno:
        why = os.strerror(e.errno)
    else:  # e.g. safetensors: "Error while serializing: I/O error: No space left on device (os error 28)"
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    full = next((s for s in ("No space left on device", "Disk quota exceeded") if s in why), None)
    fix = "free space on that disk" if full else "check that the folder is writable"
    return ConfigError(f"could not write {path} ({full or why}); {fix} and run the same command again "
                       f"(what was written before is intact)")


def inside(folder: Path, name: str, what: str) -> Path:
    """`folder / name` for a name read from a file (a manifest, a checkpoint, a tar member's key),
    refusing a name that would leave `folder`: absolute, with `..`, or empty. `what` says where the name
    came from, for the one sentence."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name or "\0" in name:
        raise ConfigError(f"{what} names {name!r}, which is outside {folder}; names read from files must stay "
                          f"inside their folder: rebuild or repair the file rather than pointing elsewhere")
    return folder / name


def sample_key(key: str, where: str) -> str:
    """A sample key read from a shard, checked before it becomes a tar member or file name: relative,
    without `..`, NUL or backslash (a key may hold `/`, webdataset's folder prefix)."""
    parts = key.split("/")
    if not key or key.startswith("/") or ".." in parts or "\\" in key or "\0" in key:
        raise ConfigError(f"{where} holds a sample key {key[:80]!r} that would name a file outside its folder; "
                          f"rebuild that shard set with `make shards`")
    return key
