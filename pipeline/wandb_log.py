"""W&B's run files on disk: read them back (wandb 0.31 has no public reader), and upload a run's
segments as one run.

    from pipeline import wandb_log
    rows = wandb_log.history(run_dir)       # [{"_step": 10, "loss/recon": 0.12, "media/recon": {...}}, ...]
    wandb_log.config(run_dir)["train"]["max_steps"]
    for key, step, png in wandb_log.media(run_dir): ...   # ("media/recon", 200, Path(".../x.png"))
    wandb_log.last_step(run_dir, run_id)    # the highest step earlier segments of the run logged
    python -m pipeline.wandb_log sync [RUNS ...]         # `make sync`: one `wandb sync` per run

The trainer uses last_step() so that a restarted run logs to W&B only the steps after those its
earlier segments hold; the tests use the readers to prove what was logged. Call the readers after
the writing process finished (Tracker.finish() waits for wandb-core with wandb.teardown()).

`run_dir` may be a training run folder (holding `wandb/`), a `wandb/` folder, one
`offline-run-*` folder or a `run-<id>.wandb` file. A resumed run leaves one `offline-run-*`
folder per process start (same id, later timestamp); the helpers read them all, oldest first.

File format (written by wandb-core's Go `leveldb/record` writer; checked against 0.31.0):
- a 7-byte file header: b":W&B", magic 0xBEE1 (uint16 LE), version 0 (uint8);
- then the LevelDB log format: 32 KiB blocks counted from the start of the file (the header sits
  in block 0); each record chunk has a 7-byte header: checksum (uint32 LE), length (uint16 LE),
  type (1 full, 2 first, 3 middle, 4 last); a block tail shorter than 7 bytes is zero padding.
- the checksum is plain CRC-32 (IEEE, zlib.crc32) of the type byte followed by the chunk data,
  unmasked (not LevelDB's masked CRC-32C);
- each reassembled payload is one serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # imported where records are parsed: the trainer imports this module, and wandb's
    from wandb.proto import wandb_internal_pb2 as pb  # protobufs cost ~0.5 s of every start-up

HEADER = struct.Struct("<4sHB")  # ident, magic, version
HEADER_IDENT, HEADER_MAGIC, HEADER_VERSION = b":W&B", 0xBEE1, 0
CHUNK = struct.Struct("<IHB")  # checksum, length, type
BLOCK_BYTES = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class CorruptLog(ValueError):
    """The .wandb file is not a W&B transaction log or a chunk fails its checksum."""


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """The raw record payloads of one `.wandb` file, in order, read as they are asked for (the file is
    memory-mapped: finding a run's first record does not read the rest of a long run's log).

    A chunk cut short at the end of the file (a process killed mid-write) ends the log quietly,
    as `wandb sync` treats it; a checksum mismatch anywhere before that raises CorruptLog.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < HEADER.size:
            raise CorruptLog(f"{path}: {os.fstat(f.fileno()).st_size} bytes is shorter than the W&B file header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            ident, magic, version = HEADER.unpack_from(data, 0)
            if (ident, magic, version) != (HEADER_IDENT, HEADER_MAGIC, HEADER_VERSION):
                raise CorruptLog(f"{path}: not a W&B transaction log (header {data[:HEADER.size]!r})")
            pending: list[bytes] | None = None  # chunks of a FIRST..LAST record being reassembled
            pos = HEADER.size
            while pos < len(data):
                block_left = BLOCK_BYTES - pos % BLOCK_BYTES
                if block_left < CHUNK.size:  # zero padding at a block tail
                    pos += block_left
                    continue
                if pos + CHUNK.size > len(data):
                    break  # truncated chunk header
                checksum, length, kind = CHUNK.unpack_from(data, pos)
                if checksum == 0 and length == 0 and kind == 0:
                    break  # preallocated zeros after the last record
                start, end = pos + CHUNK.size, pos + CHUNK.size + length
                if end > len(data):
                    break  # truncated chunk data
                if end > pos + block_left:
                    raise CorruptLog(f"{path}: chunk at byte {pos} crosses a block boundary")
                chunk = data[start:end]
                if zlib.crc32(bytes([kind]) + chunk) != checksum:
                    raise CorruptLog(f"{path}: checksum mismatch in the chunk at byte {pos}")
                pos = end
                if kind == FULL:
                    yield chunk
                elif kind == FIRST:
                    pending = [chunk]
                elif kind in (MIDDLE, LAST) and pending is not None:
                    pending.append(chunk)
                    if kind == LAST:
                        yield b"".join(pending)
                        pending = None
                else:
                    raise CorruptLog(f"{path}: unexpected chunk type {kind} at byte {pos - length - CHUNK.size}")


def read_payloads(path: str | Path) -> list[bytes]:
    """All payloads of one `.wandb` file (iter_payloads, as a list)."""
    return list(iter_payloads(path))


def _pb():
    from wandb.proto import wandb_internal_pb2

    return wandb_internal_pb2


def iter_records(path: str | Path) -> Iterator[pb.Record]:
    """Every `Record` of one `.wandb` file, in the order they were written, parsed as asked for."""
    for payload in iter_payloads(path):
        record = _pb().Record()
        record.ParseFromString(payload)
        yield record


def read_records(path: str | Path) -> list[pb.Record]:
    return list(iter_records(path))


_RUN_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-.*?(?:-(\d+))?$")


def _start_order(folder: Path) -> tuple[str, int, str]:
    """Folders are <offline-run|run>-<YYYYmmdd_HHMMSS>-<id>, with "-<n>" appended by wandb when a
    folder of that name (same id, same second) exists already."""
    m = _RUN_FOLDER.match(folder.name)
    return (m.group(1), int(m.group(2) or 0), folder.name) if m else ("", 0, folder.name)


def wandb_files(run_dir: str | Path) -> list[Path]:
    """The `run-<id>.wandb` files under `run_dir`, in the order their processes started."""
    p = Path(run_dir)
    if p.is_file():
        return [p]
    for base in (p / "wandb", p):
        found = [f for f in base.glob("*run-*/run-*.wandb") if not f.parent.is_symlink()]  # skip latest-run
        if found:
            return sorted(found, key=lambda f: _start_order(f.parent))
    found = sorted(p.glob("run-*.wandb"))
    if not found:
        raise FileNotFoundError(f"no run-*.wandb file under {p}")
    return found


def _records(run_dir: str | Path) -> list[tuple[Path, pb.Record]]:
    return [(f, r) for f in wandb_files(run_dir) for r in read_records(f)]


def _item_value(item: Any) -> Any:
    """An item's value: `value_json` (the default encoding) or, for history items written with
    x_history_value_encoding=typed, the typed `value` oneof."""
    if item.value_json:
        return json.loads(item.value_json)
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which is None or which == "none":
        return None
    return json.loads(item.json) if which == "json" else getattr(item, which)


def _item_path(item: Any) -> list[str]:
    """wandb-core writes keys as `nested_key` paths (["loss/recon"], ["media/recon", "path"]);
    older writers used `key`."""
    return list(item.nested_key) if item.nested_key else [item.key]


def _apply(out: dict[str, Any], items: Any, remove: Any = ()) -> dict[str, Any]:
    """Set each item's value at its key path in `out` (nested dicts), then drop removed keys."""
    for item in items:
        *parents, last = _item_path(item)
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = _item_value(item)
    for item in remove:
        *parents, last = _item_path(item)
        node = out
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return out


def run_id(run_dir: str | Path) -> str:
    """The W&B run id recorded in the (first) offline run under `run_dir`."""
    for _, r in _records(run_dir):
        if r.WhichOneof("record_type") == "run" and r.run.run_id:
            return r.run.run_id
    raise ValueError(f"no run record under {run_dir}")


def run_records(run_dir: str | Path) -> list[pb.RunRecord]:
    """One RunRecord per process start (the first of each file): id, project, display_name, resume flag."""
    out = []
    for f in wandb_files(run_dir):
        for r in read_records(f):
            if r.WhichOneof("record_type") == "run":
                out.append(r.run)
                break
    return out


def history(run_dir: str | Path) -> list[dict[str, Any]]:
    """Logged rows in order: {"_step": step, "loss/recon": 0.12, "media/recon": {"_type": "image-file",
    "path": ...}, ...} (W&B adds `_step`, `_runtime`, `_timestamp`)."""
    rows = []
    for _, r in _records(run_dir):
        if r.WhichOneof("record_type") == "history":
            row = _apply({}, r.history.item)
            row.setdefault("_step", r.history.step.num)
            rows.append(row)
    return rows


def config(run_dir: str | Path) -> dict[str, Any]:
    """The run config as logged (the run record's config, then config updates), W&B's `_wandb` key dropped."""
    out: dict[str, Any] = {}
    for _, r in _records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            _apply(out, r.run.config.update, r.run.config.remove)
        elif kind == "config":
            _apply(out, r.config.update, r.config.remove)
    out.pop("_wandb", None)
    return out


def summary(run_dir: str | Path) -> dict[str, Any]:
    """The run summary as recorded: explicit `summary.update`s plus the last logged value of each key
    (wandb-core writes the latter as summary records too)."""
    out: dict[str, Any] = {}
    for _, r in _records(run_dir):
        if r.WhichOneof("record_type") == "summary":
            _apply(out, r.summary.update, r.summary.remove)
    return out


def exit_codes(run_dir: str | Path) -> list[int]:
    """The exit code of each process start that finished (none for a killed process)."""
    return [r.exit.exit_code for _, r in _records(run_dir) if r.WhichOneof("record_type") == "exit"]


def media(run_dir: str | Path) -> list[tuple[str, int, Path]]:
    """Logged images as (key, step, PNG path on disk), in logging order.

    wandb.Image writes the PNG under <offline-run>/files/media/images/ and logs a dict with
    `_type: image-file` and `path` relative to that run's files/ folder.
    """
    out = []
    for f, r in _records(run_dir):
        if r.WhichOneof("record_type") != "history":
            continue
        row = _apply({}, r.history.item)
        step = int(row.get("_step", r.history.step.num))
        for key, value in row.items():
            if isinstance(value, dict) and value.get("_type") == "image-file":
                out.append((key, step, f.parent / "files" / value["path"]))
    return out


def artifacts(run_dir: str | Path) -> list[dict[str, Any]]:
    """The artifacts the run's processes logged or used, in order: {"type", "name", "digest", "aliases",
    "used" (use_after_commit: an input of the run), "metadata", "files": {path: {"digest", "ref",
    "size", "local_path"}}}. Offline, `local_path` is the staged copy `wandb sync` uploads (empty for
    a reference)."""
    out = []
    for _, r in _records(run_dir):
        if r.WhichOneof("record_type") != "artifact":
            continue
        a = r.artifact
        files = {e.path: {"digest": e.digest, "ref": e.ref, "size": e.size, "local_path": e.local_path}
                 for e in a.manifest.contents}
        out.append({"type": a.type, "name": a.name, "digest": a.digest, "aliases": list(a.aliases),
                    "used": a.use_after_commit, "metadata": json.loads(a.metadata or "{}"), "files": files})
    return out


# --------------------------------------------------------------------------------------------
# Segments of one run: what the earlier ones logged, and uploading them together
# --------------------------------------------------------------------------------------------


def segments(run_dir: str | Path) -> list[tuple[Path, str, float, bool]]:
    """(folder, run id, start time, offline) of every process start under run_dir/wandb, in start order.
    A file whose run record cannot be read (a process killed before writing it) is left out."""
    out = []
    base = Path(run_dir) / "wandb"
    for f in sorted(base.glob("*run-*/run-*.wandb")) if base.is_dir() else []:
        if f.parent.is_symlink():  # latest-run
            continue
        try:  # the run record comes first: the rest of the file is not read
            run = next((r.run for r in iter_records(f) if r.WhichOneof("record_type") == "run"), None)
        except (CorruptLog, OSError):
            run = None
        if run is not None:
            start = run.start_time.seconds + run.start_time.nanos / 1e9
            out.append((f.parent, run.run_id, start, f.parent.name.startswith("offline-")))
    return sorted(out, key=lambda s: (s[2], _start_order(s[0])))


def last_step(run_dir: str | Path, run_id: str) -> int | None:
    """The highest history step that the earlier segments of run `run_id` hold in their files (what
    `wandb sync` would upload, or what an online segment already sent), or None when there is none.
    Read, not guessed: a segment killed before its last rows reached the file does not claim them."""
    steps = []
    for folder, rid, _, _ in segments(run_dir):
        if rid != run_id:
            continue
        try:
            steps += [r.history.step.num for r in iter_records(next(folder.glob("run-*.wandb")))
                      if r.WhichOneof("record_type") == "history"]
        except (CorruptLog, OSError, StopIteration):
            continue
    return max(steps) if steps else None


def sync_commands(runs: list[str | Path]) -> list[list[str]]:
    """One `wandb sync` command per run folder found under `runs` (a folder holding wandb/), naming its
    offline segments in start order.

    wandb 0.31's `wandb sync` hands all files of one call to wandb-core, which groups them by run and
    syncs the files of one run one after another in ascending start time (core/internal/runsync/
    runsyncoperation.go, initAndPlan); files given in separate calls would race or land in any
    order. Segments already uploaded carry a `.wandb.synced` marker and are skipped by wandb itself,
    so syncing again after another restart uploads only the new segment. Online segments are live
    already and are left out. The trainer makes every segment's steps disjoint from the earlier
    ones' (last_step), so appending them never overwrites history."""
    commands = []
    for root in runs:
        root = Path(root)
        # a run folder: holds wandb/ and the wandb_run_id the Tracker writes (sweeps nest them deeper)
        run_dirs = sorted({p.parent for p in root.rglob("wandb_run_id") if (p.parent / "wandb").is_dir()})
        for run_dir in run_dirs:
            offline = [str(folder) for folder, _, _, is_offline in segments(run_dir) if is_offline]
            if offline:
                commands.append(["wandb", "sync", *offline])
    return commands


def main(argv: list[str] | None = None) -> int:
    import argparse
    import shutil
    import subprocess
    import sys

    p = argparse.ArgumentParser(prog="python -m pipeline.wandb_log",
                                description="Upload offline W&B runs: one `wandb sync` per run, segments in start order.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sync", help="upload every run folder under RUNS (default: runs)")
    s.add_argument("runs", nargs="*", default=["runs"])
    s.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    commands = sync_commands(args.runs)
    # The wandb on PATH if there is one (an activated environment), else the one beside this Python.
    wandb = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    commands = [[wandb, *cmd[1:]] for cmd in commands]
    if not commands:
        print(f"no offline W&B runs under {', '.join(args.runs)}")
        return 0
    failed = 0
    for cmd in commands:
        print(" ".join(cmd), flush=True)
        if not args.dry_run:
            failed += subprocess.run(cmd).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
