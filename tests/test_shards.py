"""pipeline.shards: a bad-file corpus, byte-identical re-runs, verify, dedup, stable splits, safe rewrites,
and the command line's sentences and exit codes. Images are 40x30 and made in tmp_path."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import shards as shards_mod
from pipeline.images import decode_image
from pipeline.shards import ShardsError, verify_shards, write_shards

ROOT = Path(__file__).resolve().parents[1]
W, H = 40, 30


def noise_image(seed: int, mode: str = "RGB", size=(W, H)) -> Image.Image:
    """A distinct, smooth-ish picture per seed (so no two test images are duplicates)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    return img if mode == "RGB" else img.convert(mode)


def save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def read_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every shard in folder (asserting no key appears in two shards)."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                assert ext not in samples.get(key, {}), f"{m.name} stored twice"
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def write(src, tmp_path, name="t", **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda line: None)
    return write_shards(src, tmp_path / "out", name, kw.pop("size", 16), **kw)


# ------------------------------------------------------------------------------------------------
# The bad-file corpus
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    """Two class folders (one with a unicode name) full of awkward files. -> (src, good, bad)."""
    src = tmp_path / "src"
    good: dict[str, tuple[str, tuple[int, int]]] = {}  # rel path -> (class, displayed (w, h))

    def add_good(rel, img, **kw):
        save(img, src / rel, **kw)
        good[rel] = (rel.split("/")[0], kw.pop("_display", img.size))

    add_good("daisy/plain.jpg", noise_image(1), quality=95)
    add_good("daisy/UPPER CASE.JPG", noise_image(2), format="JPEG")
    add_good("daisy/fleur rosé 01.png", noise_image(3))
    add_good("daisy/grey.png", noise_image(4, "L"))
    add_good("daisy/bilevel.bmp", noise_image(5, "1"))
    add_good("daisy/photo.webp", noise_image(6), quality=90)
    add_good("daisy/scan.TIFF", noise_image(7), format="TIFF")
    add_good("rosé/cmyk.jpg", noise_image(8, "CMYK"), quality=95)
    sixteen = Image.fromarray((np.asarray(noise_image(9, "L")).astype(np.uint16) * 257))
    assert sixteen.mode.startswith("I;16")
    add_good("rosé/sixteen-bit.png", sixteen)
    pal = noise_image(10).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    add_good("rosé/palette-transparent.png", pal, transparency=3)
    add_good("rosé/anim.gif", noise_image(11).convert("P"))
    add_good("rosé/la.png", noise_image(12, "LA"))
    add_good("rosé/rgba.png", noise_image(13, "RGBA"))
    rotated = noise_image(14)
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed rotated: 30 wide, 40 high
    save(rotated, src / "rosé/rotated.jpeg", exif=exif)
    good["rosé/rotated.jpeg"] = ("rosé", (H, W))

    bad: dict[str, str] = {}  # rel path -> a word the reason must contain
    jpg = src / "daisy/plain.jpg"
    (src / "daisy/truncated.jpg").write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    bad["daisy/truncated.jpg"] = "truncated"
    (src / "daisy/empty.jpg").write_bytes(b"")
    bad["daisy/empty.jpg"] = "empty"
    (src / "rosé/text.jpg").write_text("this is not a picture\n")
    bad["rosé/text.jpg"] = "not a readable image"
    save(noise_image(15, size=(1, 1)), src / "rosé/one-pixel.png")
    bad["rosé/one-pixel.png"] = "too small"
    png = (src / "daisy/grey.png").read_bytes()
    (src / "rosé/truncated.png").write_bytes(png[: len(png) // 2])
    bad["rosé/truncated.png"] = ""
    save(noise_image(16), src / "loose-at-root.jpg")
    bad["loose-at-root.jpg"] = "class folder"

    (src / "daisy/notes.txt").write_text("not an image, ignored silently\n")
    (src / "rosé/.DS_Store").write_bytes(b"\0\0junk")
    (src / "rosé/._hidden.jpg").write_bytes(b"macOS resource fork")
    return src, good, bad


def test_bad_file_corpus(corpus, tmp_path):
    src, good, bad = corpus
    manifest = write(src, tmp_path)
    out = tmp_path / "out" / "t"
    samples = read_samples(out)

    stored = {json.loads(s["json"])["path"]: s for s in samples.values()}
    assert len(samples) == len(good) and sorted(stored) == sorted(good)  # every good file exactly once
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(reasons) == sorted(bad)  # every bad file reported; notes.txt and hidden files are not
    for path, word in bad.items():
        assert word in reasons[path] and "\n" not in reasons[path] and reasons[path], (path, reasons[path])
    assert manifest["duplicates"] == []

    assert manifest["classes"] == ["daisy", "rosé"]
    for path, sample in stored.items():
        meta = json.loads(sample["json"].decode("utf-8"))
        cls_name, (w, h) = good[path]
        assert meta["class"] == cls_name
        assert int(sample["cls"]) == manifest["classes"].index(cls_name)
        assert (meta["width"], meta["height"]) == (w, h)
        assert set(sample) == {"jpg", "cls", "json"}
        arr = decode_image(sample["jpg"], "jpg")
        assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    assert verify_shards(out) == []


def test_manifest_schema(corpus, tmp_path):
    src, good, _ = corpus
    m = write(src, tmp_path, val_fraction=0.3, max_samples_per_shard=4)
    assert m == json.loads((tmp_path / "out/t/manifest.json").read_text(encoding="utf-8"))
    assert m["format"] == 1 and m["name"] == "t" and m["size"] == 16 and m["image_format"] == "jpg"
    assert set(m) >= {"format", "name", "size", "image_format", "classes", "splits", "skipped", "duplicates",
                      "options"}
    assert set(m["splits"]) == {"train", "val"}
    total = 0
    for split in m["splits"].values():
        assert set(split) == {"count", "per_class", "shards"}
        assert split["count"] == sum(s["count"] for s in split["shards"]) == sum(split["per_class"].values())
        assert set(split["per_class"]) == set(m["classes"])
        for s in split["shards"]:
            assert set(s) == {"file", "count", "bytes", "sha256"}
            assert 1 <= s["count"] <= 4 and len(s["sha256"]) == 64
            assert (tmp_path / "out/t" / s["file"]).stat().st_size == s["bytes"]
        total += split["count"]
    assert total == len(good) and m["splits"]["val"]["count"] > 0
    assert [s["file"] for s in m["splits"]["train"]["shards"]][:2] == ["train-000000.tar", "train-000001.tar"]
    assert all(set(s) == {"path", "reason"} for s in m["skipped"])
    assert m["options"]["val_fraction"] == 0.3 and m["options"]["max_samples_per_shard"] == 4


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp", "npy"])
def test_stored_formats(tmp_path, fmt):
    src = tmp_path / "flat"
    for i in range(3):
        save(noise_image(i), src / f"{i}.png")
    m = write(src, tmp_path, image_format=fmt, val_fraction=0.0)
    samples = read_samples(tmp_path / "out/t")
    assert m["image_format"] == fmt and len(samples) == 3
    for s in samples.values():
        assert set(s) == {fmt, "json"}  # flat folder: no cls
        assert decode_image(s[fmt], fmt).shape == (16, 16, 3)


def test_flat_folder_has_no_labels(tmp_path):
    src = tmp_path / "flat"
    for i in range(4):
        save(noise_image(i), src / f"img{i}.jpg")
    m = write(src, tmp_path, val_fraction=0.5)
    assert m["classes"] == [] and m["splits"]["train"]["per_class"] == {}
    for s in read_samples(tmp_path / "out/t").values():
        assert "cls" not in s and json.loads(s["json"])["class"] is None


# ------------------------------------------------------------------------------------------------
# Determinism, duplicates, splits
# ------------------------------------------------------------------------------------------------


def test_rerun_is_byte_identical(corpus, tmp_path):
    src, _, _ = corpus
    write(src, tmp_path, max_samples_per_shard=5)
    first = shard_hashes(tmp_path / "out/t")
    manifest1 = (tmp_path / "out/t/manifest.json").read_bytes()
    write(src, tmp_path, max_samples_per_shard=5)  # into the same folder: replaced by an identical set
    assert shard_hashes(tmp_path / "out/t") == first and len(first) >= 3
    assert (tmp_path / "out/t/manifest.json").read_bytes() == manifest1
    with tarfile.open(tmp_path / "out/t/train-000000.tar") as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)


@pytest.mark.slow
def test_worker_count_does_not_change_the_bytes(corpus, tmp_path):
    src, _, _ = corpus
    write(src, tmp_path, name="one", workers=1)
    write(src, tmp_path, name="two", workers=2)
    assert shard_hashes(tmp_path / "out/one") == shard_hashes(tmp_path / "out/two")


def test_duplicates_stored_once(tmp_path):
    src = tmp_path / "src"
    img = noise_image(1)
    save(img, src / "a/original.png")
    save(img, src / "a/same-pixels.bmp")  # other container, same decoded pixels
    (src / "b").mkdir()
    (src / "b/copy.png").write_bytes((src / "a/original.png").read_bytes())  # same file, other class
    save(noise_image(2), src / "b/different.png")
    m = write(src, tmp_path)
    samples = read_samples(tmp_path / "out/t")
    assert len(samples) == 2
    stored = {json.loads(s["json"])["path"] for s in samples.values()}
    dup_paths = {d["path"] for d in m["duplicates"]}
    group = {"a/original.png", "a/same-pixels.bmp", "b/copy.png"}
    assert len(dup_paths) == 2 and dup_paths < group
    (kept,) = group - dup_paths
    assert kept in stored and all(d["same_as"] == kept for d in m["duplicates"])
    assert m["skipped"] == []


def test_split_is_stable_when_files_are_added(tmp_path):
    src = tmp_path / "src"
    for i in range(24):
        save(noise_image(i), src / f"c{i % 2}/{i}.png")
    m1 = write(src, tmp_path, name="before", val_fraction=0.5)
    for i in range(24, 40):
        save(noise_image(i), src / f"c{i % 2}/{i}.png")
    m2 = write(src, tmp_path, name="after", val_fraction=0.5)

    def splits(name, m):
        out = {}
        for split in ("train", "val"):
            for s in m["splits"][split]["shards"]:
                with tarfile.open(tmp_path / "out" / name / s["file"]) as tar:
                    out.update({n.split(".")[0]: split for n in tar.getnames()})
        return out

    before, after = splits("before", m1), splits("after", m2)
    assert len(before) == 24 and len(after) == 40
    assert set(before.values()) == {"train", "val"}  # both splits used, so the check means something
    assert all(after[k] == split for k, split in before.items())


def test_shard_caps(tmp_path):
    src = tmp_path / "flat"
    for i in range(10):
        save(noise_image(i), src / f"{i}.png")
    m = write(src, tmp_path, val_fraction=0.0, max_samples_per_shard=3)
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [3, 3, 3, 1]

    def member_bytes(tar_path):  # what the cap counts: headers + 512-padded data (not the file's trailer)
        with tarfile.open(tar_path) as tar:
            return sum(512 + (m.size + 511) // 512 * 512 for m in tar.getmembers())

    cap = 6000  # about two samples of 16x16 jpg + cls + json
    m = write(src, tmp_path, name="bytes", val_fraction=0.0, max_bytes_per_shard=cap)
    shards = m["splits"]["train"]["shards"]
    assert len(shards) >= 4 and sum(s["count"] for s in shards) == 10
    assert all(member_bytes(tmp_path / "out/bytes" / s["file"]) <= cap for s in shards)


# ------------------------------------------------------------------------------------------------
# The output folder: rewrites, failures, foreign files
# ------------------------------------------------------------------------------------------------


def test_rewrite_leaves_no_stale_shards(tmp_path):
    src = tmp_path / "flat"
    for i in range(6):
        save(noise_image(i), src / f"{i}.png")
    write(src, tmp_path, val_fraction=0.0, max_samples_per_shard=1)
    assert len(list((tmp_path / "out/t").glob("*.tar"))) == 6
    write(src, tmp_path, val_fraction=0.0)
    assert sorted(p.name for p in (tmp_path / "out/t").iterdir()) == ["manifest.json", "train-000000.tar"]
    assert verify_shards(tmp_path / "out/t") == []
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".") and p.is_dir()] == []


def test_failed_run_keeps_the_previous_set(tmp_path, monkeypatch):
    src = tmp_path / "flat"
    for i in range(6):
        save(noise_image(i), src / f"{i}.png")
    write(src, tmp_path)
    before = shard_hashes(tmp_path / "out/t")

    calls = []
    real = shards_mod._process

    def dies_halfway(task):
        calls.append(task)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real(task)

    monkeypatch.setattr(shards_mod, "_process", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        write(src, tmp_path, max_samples_per_shard=1)
    assert shard_hashes(tmp_path / "out/t") == before and verify_shards(tmp_path / "out/t") == []
    assert not (tmp_path / "out/.t.partial").exists()


def test_swap_killed_halfway_is_recovered(tmp_path):
    src = tmp_path / "flat"
    for i in range(3):
        save(noise_image(i), src / f"{i}.png")
    write(src, tmp_path)
    before = shard_hashes(tmp_path / "out/t")
    os.rename(tmp_path / "out/t", tmp_path / "out/.t.old")  # as if killed between the two renames
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_text("nope")
    with pytest.raises(ShardsError):
        write(only_bad, tmp_path)  # this run fails, but first puts the parked set back
    assert shard_hashes(tmp_path / "out/t") == before and verify_shards(tmp_path / "out/t") == []


def test_refuses_to_replace_a_folder_with_other_files(tmp_path):
    src = tmp_path / "flat"
    save(noise_image(0), src / "0.png")
    (tmp_path / "out/t").mkdir(parents=True)
    (tmp_path / "out/t/my-notes.md").write_text("precious")
    with pytest.raises(ShardsError, match="not shards"):
        write(src, tmp_path)
    assert (tmp_path / "out/t/my-notes.md").read_text() == "precious"
    write(src, tmp_path, name="t2")  # the refused run released its lock: the same process can go on
    (tmp_path / "out/t/my-notes.md").unlink()
    write(src, tmp_path)


# ------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------


def test_verify_catches_truncated_altered_missing_and_unlisted(tmp_path):
    src = tmp_path / "flat"
    for i in range(8):
        save(noise_image(i), src / f"{i}.png")
    write(src, tmp_path, val_fraction=0.0, max_samples_per_shard=2)
    out = tmp_path / "out/t"
    assert verify_shards(out) == []
    ok = subprocess.run([sys.executable, "-m", "pipeline.shards", "verify", str(out)], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout

    t0, t1, t2 = out / "train-000000.tar", out / "train-000001.tar", out / "train-000002.tar"
    t0.write_bytes(t0.read_bytes()[:1500])  # truncated
    data = bytearray(t1.read_bytes())
    data[700] ^= 0xFF  # one flipped bit pattern inside the first member's data, same size
    t1.write_bytes(bytes(data))
    t2.unlink()  # missing
    (out / "train-000099.tar").write_bytes(b"")  # a stray shard the manifest does not list
    problems = "\n".join(verify_shards(out))
    assert "train-000000.tar: truncated" in problems
    assert "train-000001.tar: altered" in problems
    assert "train-000002.tar: missing" in problems
    assert "train-000099.tar" in problems
    bad = subprocess.run([sys.executable, "-m", "pipeline.shards", "verify", str(out)], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "truncated" in bad.stderr


def test_verify_without_manifest(tmp_path):
    problems = verify_shards(tmp_path)
    assert len(problems) == 1 and "manifest.json" in problems[0]


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipeline.shards", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)


def test_cli_missing_flowers_src_says_where_to_get_it(tmp_path):
    r = run_cli(tmp_path / "data/flowers", "--name", "flowers", "--out", tmp_path / "shards")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "does not exist" in lines[0] and "alxmamaev/flowers-recognition" in lines[0] and "daisy" in lines[0]
    assert not (tmp_path / "shards/flowers").exists()


@pytest.mark.parametrize("setup, expected", [
    ("empty", "holds no image files"),
    ("only-text", "holds no image files"),
    ("only-bad", "could be decoded"),
    ("a-file", "is not a folder"),
])
@pytest.mark.slow  # seconds: in make test, not in make test-fast
def test_cli_unusable_src(tmp_path, setup, expected):
    src = tmp_path / "src"
    if setup == "a-file":
        src.write_text("x")
    else:
        src.mkdir()
        if setup == "only-text":
            (src / "readme.txt").write_text("hi")
        if setup == "only-bad":
            (src / "a.jpg").write_text("not a jpeg")
            (src / "b.png").write_bytes(b"")
    r = run_cli(src, "--name", "x", "--out", tmp_path / "shards", "--no-progress")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and expected in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "shards/x").exists() and not (tmp_path / "shards/.x.partial").exists()


def test_cli_writes_and_summarises(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        save(noise_image(i), src / "only/{}.png".format(i))
    (src / "only/broken.jpg").write_text("x")
    r = run_cli(src, "--name", "demo", "--size", "16", "--out", tmp_path / "shards", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "skipped only/broken.jpg: not a readable image" in r.stdout
    summary = r.stdout.strip().splitlines()[-1]
    assert "wrote 3 images" in summary and "skipped 1" in summary and "duplicates 0" in summary
    assert "shards" in summary and " s (" in summary
    assert "img/s" in r.stderr  # the tqdm bar
    assert "single class folder" in r.stdout  # a hint for data/flowers/flowers/daisy-style nesting


def test_cli_rejects_bad_options(tmp_path):
    r = run_cli(tmp_path, "--format", "gif")
    assert r.returncode == 2 and "--format" in r.stderr
    r = run_cli(tmp_path, "--val-fraction", "1.5")
    assert r.returncode == 2


# ------------------------------------------------------------------------------------------------
# Demo data goes through the same path (no special case in the sharder)
# ------------------------------------------------------------------------------------------------


def test_demo_data_is_deterministic_and_shards_cleanly(tmp_path):
    from pipeline.demo_data import CLASSES, generate

    assert generate(tmp_path / "a", count=15, size=120, seed=3, workers=1, log=lambda line: None)
    assert not generate(tmp_path / "a", count=15, size=120, seed=3, workers=1, log=lambda line: None)  # done
    generate(tmp_path / "b", count=15, size=120, seed=3, workers=1, log=lambda line: None)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 15 and {f.parts[0] for f in files} == set(CLASSES)
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    sizes = {Image.open(tmp_path / "a" / f).size for f in files}
    assert all(57 <= min(s) and max(s) <= 120 for s in sizes) and len(sizes) > 3  # varied photo-like sizes

    generate(tmp_path / "a", count=10, size=120, seed=3, workers=1, log=lambda line: None)  # other params
    assert len(list((tmp_path / "a").rglob("*.jpg"))) == 10  # replaced, not mixed with the old set
    m = write(tmp_path / "a", tmp_path, size=16)
    assert m["classes"] == sorted(CLASSES) and m["skipped"] == [] and m["duplicates"] == []


# ------------------------------------------------------------------------------------------------
# The key (split, de-duplication) does not depend on --size; JPEGs decoded at reduced scale
# ------------------------------------------------------------------------------------------------


def photo(seed: int, size=(200, 150)) -> Image.Image:
    """A photo-like picture: smooth colour fields with some detail (for JPEG at reduced scale)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    detail = rng.integers(-20, 21, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(base).astype(int) + detail, 0, 255).astype(np.uint8))


def key_splits(folder: Path) -> dict[str, str]:
    """{sample key: split} over a written set."""
    m = json.loads((folder / "manifest.json").read_text())
    out = {}
    for split in SPLITS:
        for s in m["splits"][split]["shards"]:
            with tarfile.open(folder / s["file"]) as tar:
                out.update({n.split(".")[0]: split for n in tar.getnames()})
    return out


SPLITS = ("train", "val")


def test_jpeg_split_is_independent_of_size_and_stable_when_files_are_added(tmp_path):
    src = tmp_path / "src"
    for i in range(30):
        save(photo(i, (120 + 4 * i, 90 + 3 * i)), src / f"c{i % 2}/{i}.jpg", quality=90)
    write(src, tmp_path, name="s16", size=16, val_fraction=0.5)
    write(src, tmp_path, name="s40", size=40, val_fraction=0.5)  # other size: other DCT scale, same keys
    small, large = key_splits(tmp_path / "out/s16"), key_splits(tmp_path / "out/s40")
    assert len(small) == 30 and set(small.values()) == {"train", "val"}
    assert small == large
    for i in range(30, 45):
        save(photo(i), src / f"c{i % 2}/{i}.jpg", quality=90)
    write(src, tmp_path, name="more", size=24, val_fraction=0.5)
    more = key_splits(tmp_path / "out/more")
    assert len(more) == 45 and all(more[k] == split for k, split in small.items())


def _with_segments(jpeg: bytes, *segments: tuple[int, bytes]) -> bytes:
    """The JPEG with extra marker segments inserted after SOI."""
    extra = b"".join(bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body for marker, body in segments)
    return jpeg[:2] + extra + jpeg[2:]


def test_jpeg_key_ignores_metadata_but_not_pixels_or_orientation(tmp_path):
    buf = io.BytesIO()
    photo(1).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    key = shards_mod.jpeg_key(jpeg, 1)
    assert key == shards_mod.jpeg_key(_with_segments(jpeg, (0xFE, b"a comment"), (0xED, b"Photoshop 3.0\0iptc")), 1)
    assert key != shards_mod.jpeg_key(jpeg, 6)  # shown rotated: another image
    assert key != shards_mod.jpeg_key(_with_segments(jpeg, (0xE2, b"ICC_PROFILE\0...")), 1)  # colour: kept
    other = io.BytesIO()
    photo(1).save(other, "JPEG", quality=89)
    assert key != shards_mod.jpeg_key(other.getvalue(), 1)
    assert shards_mod.jpeg_key(b"\x89PNG\r\n", 1) is None

    # End to end: the copy with an EXIF block and a comment added is a duplicate of the original.
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a/original.jpg").write_bytes(jpeg)
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    (src / "a/with-metadata.jpg").write_bytes(_with_segments(jpeg, (0xE1, b"Exif\0\0" + exif.tobytes()[6:]),
                                                            (0xFE, b"edited")))
    save(photo(2), src / "a/other.jpg", quality=90)
    m = write(src, tmp_path)
    (dup,) = m["duplicates"]
    assert {dup["path"], dup["same_as"]} == {"a/original.jpg", "a/with-metadata.jpg"}
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 2


def test_reduced_jpeg_decode_stores_what_a_full_decode_would(tmp_path):
    from pipeline.images import load_rgb, resize_center_crop

    src = tmp_path / "src"
    y, x = np.mgrid[0:480, 0:640]
    grating = 127 + 100 * np.sin(2 * np.pi * x / 22) * np.cos(2 * np.pi * y / 17)  # detail at the output scale
    arr = np.clip(np.stack([grating, np.roll(grating, 5, 1), 255 - grating], -1), 0, 255).astype(np.uint8)
    path = save(Image.fromarray(arr), src / "big.jpg", quality=92)  # 480 -> 64: decoded at 1/4 scale (160x120)
    m = write(src, tmp_path, size=64, val_fraction=0.0, image_format="png")  # png: no second lossy step
    (sample,) = read_samples(tmp_path / "out/t").values()
    stored = decode_image(sample["png"], "png").astype(int)
    full = np.asarray(resize_center_crop(load_rgb(path), 64)).astype(int)  # full-size decode, one resize
    assert stored.shape == full.shape == (64, 64, 3)
    # Measured: 1.8 / 6 levels; decoding one DCT scale too small (80x60, then upscaled) gives 13 / 50.
    assert np.abs(stored - full).mean() < 3.0 and np.abs(stored - full).max() < 20
    assert (m["skipped"], json.loads(sample["json"])["width"]) == ([], 640)


def test_shards_are_the_bytes_tarfile_writes(tmp_path):
    """The writer assembles tar members itself (in the workers); a tar written by tarfile from the
    same members, with the same metadata, is byte for byte the same file."""
    src = tmp_path / "src"
    for i in range(5):
        save(photo(i), src / f"c/{i}.jpg", quality=90)
    m = write(src, tmp_path, val_fraction=0.0)
    shard = tmp_path / "out/t" / m["splits"]["train"]["shards"][0]["file"]
    with tarfile.open(shard) as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar.getmembers()]
    again = io.BytesIO()
    with tarfile.open(fileobj=again, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(shards_mod._tarinfo(name, len(data)), io.BytesIO(data))
    assert again.getvalue() == shard.read_bytes()


@pytest.mark.parametrize("name, size", [("0123456789abcdef0123.jpg", 9_000), ("k.cls", 1), ("k.json", 0),
                                        ("x" * 100, 512), ("d" * 60 + "/" + "y" * 60, 7), ("é.json", 3)])
def test_tar_member_header_is_tarfiles(name, size):
    """Headers are built by hand for short ASCII names (tarfile's pure-Python header cost ~35 us), by
    tarfile otherwise: both must be what tarfile writes."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(shards_mod._tarinfo(name, size), io.BytesIO(data))
    member = shards_mod._tar_member(name, data)
    assert len(member) == 512 + size + (-size % 512) and ref.getvalue()[:len(member)] == member


# ------------------------------------------------------------------------------------------------
# Parts and merge (what the SLURM array tasks and the merge job run; tests/test_shards_slurm.py
# runs them through slurm/shards.sbatch on a real cluster)
# ------------------------------------------------------------------------------------------------


def write_parts(src, tmp_path, parts, which=None, **kw):
    kw.update(workers=1, progress=False, log=lambda line: None)
    for part in (range(parts) if which is None else which):
        shards_mod.write_part(src, tmp_path / "out", "t", 16, part=part, parts=parts, **kw)


@pytest.mark.parametrize("parts", [1, 3, 7])
def test_parts_merged_are_byte_identical_to_one_process(corpus, tmp_path, parts):
    src, _, _ = corpus
    kw = dict(val_fraction=0.3, max_samples_per_shard=4)
    m1 = write(src, tmp_path, name="one", **kw)
    write_parts(src, tmp_path, parts, **kw)
    assert not (tmp_path / "out/t").exists()  # parts alone are no shard set
    m2 = shards_mod.merge_parts(src, tmp_path / "out", "t", 16, parts=parts, progress=False,
                                log=lambda line: None, **kw)
    assert shard_hashes(tmp_path / "out/t") == shard_hashes(tmp_path / "out/one") and len(shard_hashes(tmp_path / "out/t")) >= 3
    assert {**m2, "name": "one"} == m1 and m1["skipped"] and verify_shards(tmp_path / "out/t") == []
    assert not (tmp_path / "out/.t.parts").exists()  # parts removed once the set is in place


def test_merge_refuses_missing_or_foreign_parts_and_a_resubmitted_part_completes_it(corpus, tmp_path):
    src, _, _ = corpus
    write_parts(src, tmp_path, 3, which=[0, 2])
    with pytest.raises(ShardsError, match=r"part 1 of 3 is missing.*--array=1 slurm/shards.sbatch"):
        shards_mod.merge_parts(src, tmp_path / "out", "t", 16, parts=3, progress=False)
    assert not (tmp_path / "out/t").exists()
    write_parts(src, tmp_path, 3, which=[1], quality=80)  # resubmitted with other options: refused
    with pytest.raises(ShardsError, match=r"part 1 was made from another file list, other options or other"):
        shards_mod.merge_parts(src, tmp_path / "out", "t", 16, parts=3, progress=False)
    real = shards_mod.library_versions
    shards_mod.library_versions = lambda: {**real(), "torch": "0.0.1"}  # a node with another environment
    try:
        write_parts(src, tmp_path, 3, which=[1])
    finally:
        shards_mod.library_versions = real
    with pytest.raises(ShardsError, match=r"part 1 was made from .* other library versions"):
        shards_mod.merge_parts(src, tmp_path / "out", "t", 16, parts=3, progress=False)
    write_parts(src, tmp_path, 3, which=[1])  # resubmitted alone, as it should have been
    shards_mod.merge_parts(src, tmp_path / "out", "t", 16, parts=3, progress=False, log=lambda line: None)
    write(src, tmp_path, name="one")
    assert shard_hashes(tmp_path / "out/t") == shard_hashes(tmp_path / "out/one")


def test_cli_part_and_merge_options_are_checked(tmp_path):
    src = tmp_path / "flat"
    save(noise_image(0), src / "0.png")
    for args, expected in [(["--part", "0"], "--parts goes with exactly one of"),
                           (["--parts", "2"], "--parts goes with exactly one of"),
                           (["--parts", "2", "--part", "2"], "--part 2 is not in 0..1")]:
        r = run_cli(src, "--out", tmp_path / "shards", *args)
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr
