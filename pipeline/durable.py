"""Files that survive a crash: every file a run keeps is written here, whole or not at all.

    durable.write_json(run_dir / "summary.json", summary, indent=2)
    durable.write_text(run_dir / "config.yaml", text)
    durable.write_with(path, lambda tmp: image.save(tmp, format="PNG"))   # a library that writes a path
    durable.fsync_path(folder)                                           # after renaming into `folder`
    with durable.Writer(path) as w: w.file.write(...)                    # a file written in pieces
    durable.write_staged(stage / "model.safetensors", save)              # a file in a staging folder ...
    durable.replace_folder(stage, final, parked)                         # ... which is then put in place


Each write goes to a temporary file beside the target, which is fsynced, renamed over the target
(atomic on POSIX) and then the folder is fsynced so the rename itself is on disk. A crash or a full
disk at any moment leaves the previous file or the new one, never a torn mix; the temporary file is
removed when the write fails.

A failure to write (ENOSPC, EDQUOT, EROFS, EIO, ...) raises `UserError` (pipeline.errors) with one sentence naming the
file and the reason: the CLIs print it and exit non-zero, like any other problem the user must fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import UserError


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


def write_json(path: str | Path, data: Any, tmp: Path | None = None, end: str = "", **dumps: Any) -> Path:
    """JSON of `data` (json.dumps keyword arguments in `dumps`: indent, sort_keys, ...), then `end`
    (a final newline, for files people read)."""
    return write_text(path, json.dumps(data, **dumps) + end, tmp)


class Writer:
    """A file written in pieces (a tar being filled, a shard) under its temporary name, and renamed
    over `path` only at `commit()`: write_with's guarantee for a file too big to build in memory.

        with durable.Writer(path) as w:     # commits on leaving the block, aborts on an exception
            w.file.write(blob)

    `file` is the open binary file (for tarfile.open(fileobj=...) or plain writes); `abort()` closes
    and removes the temporary file, leaving `path` as it was."""

    def __init__(self, path: str | Path, tmp: Path | None = None, buffering: int = -1):
        self.path = Path(path)
        self.tmp = tmp or temp_for(self.path)
        try:
            self.file = open(self.tmp, "wb", buffering=buffering)
        except OSError as e:
            raise write_error(self.path, e) from None

    def commit(self) -> Path:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
            fsync_path(self.path.parent)
        except OSError as e:
            self.abort()
            raise write_error(self.path, e) from None
        return self.path

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_staged(path: str | Path, write: Callable[[Path], Any],
                 errors: tuple[type[BaseException], ...] = ()) -> Path:
    """A file inside a staging folder that `replace_folder` publishes whole (a checkpoint, an export):
    `write(path)` writes it in place and it is fsynced; the folder's rename is the atomic step, so the
    file needs no rename of its own. `errors` as in write_with."""
    path = Path(path)
    try:
        write(path)
        fsync_path(path)
    except (OSError, *errors) as e:
        raise write_error(path, e) from None
    return path


def replace_folder(stage: Path, final: Path, parked: Path) -> Path:
    """Put a folder whose files were all written durably (`stage`) in place of `final`, and make the
    renames durable. A previous `final` (a folder or a file) is first renamed to `parked`, then removed
    once `stage` is in place: a kill between the two renames leaves `parked` whole and `final` absent,
    which the caller recovers from (restore `parked`) or ignores (a fresh write). `stage` is fsynced
    first, so the names in it are on disk before it appears as `final`."""
    previous = final.exists() or final.is_symlink()
    try:
        fsync_path(stage)
        if previous:
            os.replace(final, parked)
        os.replace(stage, final)
        fsync_path(final.parent)
    except OSError as e:
        raise write_error(final, e) from None
    if previous:  # what is left of it if this fails is the caller's stale `parked`, removed on its next start
        if parked.is_dir() and not parked.is_symlink():
            shutil.rmtree(parked, ignore_errors=True)
        else:
            parked.unlink(missing_ok=True)
    return final


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


def write_error(path: Path, e: BaseException) -> UserError:
    """One sentence for a failed write, naming the file and why (a full disk said as such)."""
    if isinstance(e, OSError) and e.errno:
        why = os.strerror(e.errno)
    else:  # e.g. safetensors: "Error while serializing: I/O error: No space left on device (os error 28)"
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    full = next((s for s in ("No space left on device", "Disk quota exceeded") if s in why), None)
    fix = "free space on that disk" if full else "check that the folder is writable"
    return UserError(f"could not write {path} ({full or why}); {fix} and run the same command again "
                       f"(what was written before is intact)")


def inside(folder: Path, name: str, what: str) -> Path:
    """`folder / name` for a name read from a file (a manifest, a checkpoint, a tar member's key),
    refusing a name that would leave `folder`: absolute, with `..`, or empty. `what` says where the name
    came from, for the one sentence."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name or "\0" in name:
        raise UserError(f"{what} names {name!r}, which is outside {folder}; names read from files must stay "
                          f"inside their folder: rebuild or repair the file rather than pointing elsewhere")
    return folder / name


def sample_key(key: str, where: str) -> str:
    """A sample key read from a shard, checked before it becomes a tar member or file name: relative,
    without `..`, NUL or backslash (a key may hold `/`, webdataset's folder prefix)."""
    parts = key.split("/")
    if not key or key.startswith("/") or ".." in parts or "\\" in key or "\0" in key:
        raise UserError(f"{where} holds a sample key {key[:80]!r} that would name a file outside its folder; "
                          f"rebuild that shard set with `make shards`")
    return key
