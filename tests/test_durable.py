"""pipeline.durable: a file is replaced whole or not at all, and a full disk is one sentence; on a real
small tmpfs, a training run that fills it exits non-zero with one line and loses nothing written before."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline import durable
from pipeline.errors import UserError
from test_train import command, run, tiny_args


def test_write_replaces_whole_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.json"
    durable.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match=r"could not write .*x.json \(No space left on device\); free space"):
        durable.write_with(path, fail)
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_file_written_in_pieces_appears_only_when_committed(tmp_path):
    path = tmp_path / "train-000000.tar"
    path.write_bytes(b"old")
    with durable.Writer(path) as w:
        w.file.write(b"new ")
        w.file.write(b"bytes")
        assert path.read_bytes() == b"old" and w.tmp.exists()  # still the previous file while being written
    assert path.read_bytes() == b"new bytes" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    with pytest.raises(RuntimeError, match="killed"):  # an exception in the block: aborted, the old file kept
        with durable.Writer(path, tmp=tmp_path / "train-000000.tar.tmp") as w:
            w.file.write(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"new bytes" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    with pytest.raises(UserError, match=r"could not write .*missing/x.tar \(No such file or directory\); check"):
        durable.Writer(tmp_path / "missing" / "x.tar")


def test_a_staged_folder_replaces_the_previous_one_whole(tmp_path):
    final, parked = tmp_path / "out", tmp_path / ".out.old"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    stage = tmp_path / ".out.tmp"
    stage.mkdir()
    durable.write_staged(stage / "model.yaml", lambda p: p.write_text("new"))
    assert durable.replace_folder(stage, final, parked) == final
    assert [p.name for p in final.iterdir()] == ["model.yaml"] and (final / "model.yaml").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the previous folder and the stage are gone

    # No previous folder: a plain rename. A file where the folder goes is replaced too (--force over a file).
    other = tmp_path / "other"
    other.write_text("a file")
    for target in (tmp_path / "fresh", other):
        stage.mkdir()
        (stage / "x").write_text("x")
        durable.replace_folder(stage, target, parked)
        assert target.is_dir() and (target / "x").read_text() == "x" and not parked.exists() and not stage.exists()

    # A failure is one sentence, and the previous folder is where it was.
    with pytest.raises(UserError, match=r"could not write .*out \(No such file or directory\)"):
        durable.replace_folder(tmp_path / "missing", final, parked)
    assert (final / "model.yaml").read_text() == "new"


def test_a_staged_file_is_fsynced_and_a_failed_write_is_one_sentence(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    durable.write_staged(tmp_path / "a.json", lambda p: p.write_text("{}"))
    assert synced == [str(tmp_path / "a.json")] and (tmp_path / "a.json").read_text() == "{}"

    class LibraryError(Exception):  # e.g. safetensors' SafetensorError, which carries ENOSPC as text
        pass

    def full(p: Path) -> None:
        raise LibraryError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(UserError, match=r"could not write .*b.safetensors \(No space left on device\); free space"):
        durable.write_staged(tmp_path / "b.safetensors", full, errors=(LibraryError,))


@pytest.mark.parametrize("name", ["../x.tar", "/etc/passwd", "a/../../b", ""])
def test_a_name_read_from_a_file_cannot_leave_its_folder(tmp_path, name):
    with pytest.raises(UserError, match=r"manifest.json names .* which is outside"):
        durable.inside(tmp_path, name, "manifest.json")
    assert durable.inside(tmp_path, "sub/train-000000.tar", "m") == tmp_path / "sub/train-000000.tar"


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB tmpfs (root only): the disk a run fills. Skipped where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave_bytes: int) -> None:
    """Fill the disk up to `leave_bytes` free (whole 4 KiB pages)."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
        f.truncate(0)
        try:
            f.write(bytes(max(0, free - leave_bytes)))
        except OSError:
            pass  # full before the last bytes: that is the point


@pytest.mark.slow
def test_a_full_disk_is_one_sentence_and_loses_nothing_written_before(tiny_shards, small_disk):
    run_dir = small_disk / "run"
    args = tiny_args(tiny_shards, run_dir, "tracking.mode=disabled", "tracking.media_every_steps=100",
                     "tracking.eval_every_steps=100", "train.max_steps=5")
    first = run(command(1, args))
    assert first.returncode == 0, first.stderr[-3000:]
    config = (run_dir / "config.yaml").read_bytes()
    ckpt = run_dir / "checkpoints" / "step-000005"
    saved = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    # A restart on a disk with no space at all: config.yaml (rewritten at every start) stays whole.
    fill(small_disk, 0)
    full = run(command(1, [*args, "train.max_steps=10", "optim.lr=0.0005"]))
    said = full.stderr.rsplit("error: ", 1)[-1].strip()  # (after the progress bar's last \r)
    assert full.returncode != 0 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert said.startswith("could not write") and "config.yaml (No space left on device)" in said and "\n" not in said
    assert (run_dir / "config.yaml").read_bytes() == config

    # Room for the start but not for the next checkpoint: the save fails in one sentence, the earlier
    # checkpoint stays complete and `latest` names it.
    fill(small_disk, sum(len(b) for b in saved.values()) // 3)
    late = run(command(1, [*args, "train.max_steps=10"]))
    said = late.stderr.rsplit("error: ", 1)[-1].strip()
    assert late.returncode != 0 and "Traceback" not in late.stderr, late.stderr[-3000:]
    assert said.startswith("could not write") and "model.safetensors (No space left on device)" in said, said
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-000005"
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == saved
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 10  # this start's, whole
