"""pipeline.images: every PIL mode comes out as the right RGB, crops are centred, stored bytes round-trip,
and corrupt stored bytes raise ValueError without ever unpickling."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TEST_ENV
from pipeline.images import (BACKGROUND_RGB, IMAGE_EXTENSIONS, STORED_FORMATS, decode_image, describe_error,
                             encode_image, load_image, load_rgb, resize_center_crop, to_rgb)


def _palette_image(transparent_index=None) -> Image.Image:
    img = Image.new("P", (4, 3), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0 = red, 1 = blue
    if transparent_index is not None:
        img.info["transparency"] = transparent_index
    return img


def _rgb_with_key() -> Image.Image:
    img = Image.new("RGB", (4, 3), (10, 20, 30))
    img.info["transparency"] = (10, 20, 30)  # a PNG tRNS colour key: this colour is transparent
    return img


# (what, image, expected RGB of pixel (0, 0))
CONVERSIONS = [
    ("CMYK red", Image.new("CMYK", (4, 3), (0, 255, 255, 0)), (255, 0, 0)),
    ("CMYK white", Image.new("CMYK", (4, 3), (0, 0, 0, 0)), (255, 255, 255)),
    ("CMYK black", Image.new("CMYK", (4, 3), (0, 0, 0, 255)), (0, 0, 0)),
    ("palette", _palette_image(), (0, 0, 255)),
    ("palette, transparent index in use", _palette_image(transparent_index=1), BACKGROUND_RGB),
    ("palette, other index transparent", _palette_image(transparent_index=0), (0, 0, 255)),
    ("LA transparent", Image.new("LA", (4, 3), (100, 0)), BACKGROUND_RGB),
    ("LA opaque", Image.new("LA", (4, 3), (100, 255)), (100, 100, 100)),
    ("RGBA half", Image.new("RGBA", (4, 3), (255, 0, 0, 128)), (255, 127, 127)),
    ("RGB colour key", _rgb_with_key(), BACKGROUND_RGB),
    ("16-bit white", Image.new("I;16", (4, 3), 65535), (255, 255, 255)),
    ("16-bit mid", Image.new("I;16", (4, 3), 32896), (128, 128, 128)),  # 32896 = 128 * 257
    ("16-bit dark stays dark", Image.new("I;16", (4, 3), 255), (1, 1, 1)),  # not clipped to white
    ("32-bit int, 16-bit range", Image.new("I", (4, 3), 65535), (255, 255, 255)),
    ("float 0..1", Image.new("F", (4, 3), 0.5), (128, 128, 128)),
    ("grey", Image.new("L", (4, 3), 77), (77, 77, 77)),
    ("bilevel", Image.new("1", (4, 3), 1), (255, 255, 255)),
    ("RGB", Image.new("RGB", (4, 3), (1, 2, 3)), (1, 2, 3)),
]


@pytest.mark.parametrize("what, img, expected", CONVERSIONS, ids=[c[0] for c in CONVERSIONS])
def test_to_rgb(what, img, expected):
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    assert np.abs(np.subtract(out.getpixel((0, 0)), expected)).max() <= 1, what


@pytest.mark.parametrize("fmt, save_kw, expected, tol", [
    ("jpg-cmyk", {"format": "JPEG", "quality": 95}, (255, 0, 0), 12),
    ("png-16bit", {"format": "PNG"}, (128, 128, 128), 1),
    ("png-palette-transparent", {"format": "PNG"}, BACKGROUND_RGB, 0),
    ("png-la", {"format": "PNG"}, BACKGROUND_RGB, 0),
    ("gif-transparent", {"format": "GIF"}, BACKGROUND_RGB, 0),
    ("tiff-cmyk", {"format": "TIFF"}, (255, 0, 0), 1),
])
def test_load_rgb_files(tmp_path, fmt, save_kw, expected, tol):
    """The same conversions through real files (the encoders store these modes natively)."""
    img = {"jpg-cmyk": lambda: Image.new("CMYK", (40, 30), (0, 255, 255, 0)),
           "png-16bit": lambda: Image.fromarray(np.full((30, 40), 32896, np.uint16)),
           "png-palette-transparent": lambda: _palette_image(transparent_index=1).resize((40, 30)),
           "png-la": lambda: Image.new("LA", (40, 30), (50, 0)),
           "gif-transparent": lambda: _palette_image(transparent_index=1).resize((40, 30)),
           "tiff-cmyk": lambda: Image.new("CMYK", (40, 30), (0, 255, 255, 0))}[fmt]()
    if fmt == "png-16bit":
        assert img.mode.startswith("I;16")
    path = tmp_path / f"x.{save_kw['format'].lower()}"
    if "transparency" in img.info:
        save_kw = {**save_kw, "transparency": img.info["transparency"]}
    img.save(path, **save_kw)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (40, 30)
    assert np.abs(np.subtract(out.getpixel((20, 15)), expected)).max() <= tol


def test_exif_orientation_applied(tmp_path):
    # Stored 40x30, left half red, right half blue; orientation 6 = "rotate 90 degrees clockwise to view".
    arr = np.zeros((30, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, quality=95, exif=exif)
    out = np.asarray(load_rgb(path))
    assert out.shape == (40, 30, 3)  # displayed portrait
    assert out[5, 15, 0] > 200 and out[5, 15, 2] < 60  # the left (red) half is now on top
    assert out[35, 15, 2] > 200 and out[35, 15, 0] < 60


@pytest.mark.parametrize("w, h, size", [(400, 300, 128), (300, 400, 128), (129, 128, 128), (128, 128, 128),
                                        (20, 10, 16), (1, 1, 8), (1000, 30, 64)])
def test_resize_center_crop_shape(w, h, size):
    out = resize_center_crop(Image.new("RGB", (w, h), (9, 9, 9)), size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8 and (out == 9).all()


def test_resize_center_crop_keeps_the_centre():
    # 300x100: red | green | blue thirds. Shorter side 100 -> 64 makes it 192x64; the centre 64 is green.
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100, 0] = arr[:, 100:200, 1] = arr[:, 200:, 2] = 255
    out = np.asarray(resize_center_crop(Image.fromarray(arr), 64)).astype(int)
    inner = out[:, 4:-4]  # away from the bicubic overshoot at the borders of the thirds
    assert inner[..., 1].min() >= 250 and inner[..., 0].max() <= 5 and inner[..., 2].max() <= 5


RESIZE_BYTES = """
import hashlib, sys
import numpy as np, torch
from PIL import Image
from pipeline.images import resize_center_crop
rng, h = np.random.default_rng(0), hashlib.sha256()
for w, hh, size in [(400, 300, 128), (301, 377, 128), (640, 480, 64), (97, 150, 256), (500, 375, 97)]:
    img = Image.fromarray(rng.integers(0, 256, (hh, w, 3), dtype=np.uint8))
    h.update(resize_center_crop(img, size).tobytes())
print(torch.backends.cpu.get_cpu_capability(), h.hexdigest())
"""


@pytest.mark.slow  # seconds: in make test, not in make test-fast
def test_resize_gives_the_same_bytes_on_every_cpu_kernel():
    """Shards written by a SLURM array on mixed nodes are byte-identical to one process's only if the
    resize is: torch's uint8 antialiased kernel for this CPU (AVX2) and its generic one (used on
    AVX-512 and ARM machines, forced here with ATEN_CPU_CAPABILITY=default) must agree exactly."""
    outs = [subprocess.run([sys.executable, "-c", RESIZE_BYTES], cwd=ROOT, capture_output=True, text=True,
                           check=True, env={**TEST_ENV, **extra}).stdout.split()
            for extra in ({}, {"ATEN_CPU_CAPABILITY": "default"})]
    if outs[0][0] == outs[1][0]:
        pytest.skip(f"this CPU has only torch's {outs[0][0]} kernels: nothing to compare")
    assert outs[1][0] == "DEFAULT" and outs[0][1] == outs[1][1], outs


def test_load_image(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(path)
    arr = load_image(path, 16)
    assert arr.dtype == np.uint8 and arr.shape == (16, 16, 3) and arr.flags.writeable
    assert (arr == [1, 2, 3]).all()


@pytest.mark.parametrize("fmt", STORED_FORMATS)
def test_encode_decode_round_trip(fmt):
    rng = np.random.default_rng(0)
    # A smooth image (lossy codecs are judged on photos, not on white noise).
    base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
    arr = np.asarray(Image.fromarray(base).resize((32, 32), Image.Resampling.BILINEAR))
    data = encode_image(arr, fmt, quality=95)
    assert isinstance(data, bytes) and encode_image(arr, fmt, quality=95) == data  # deterministic
    out = decode_image(data, fmt)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3) and out.flags.writeable
    err = np.abs(out.astype(int) - arr).mean()
    assert err == 0 if fmt in ("png", "npy") else err < 3


@pytest.mark.parametrize("ext", ["jpg", ".jpg", "JPG", "jpeg", ".JPEG"])
def test_decode_accepts_extension_spellings(ext):
    arr = np.full((8, 8, 3), 100, np.uint8)
    assert decode_image(encode_image(arr, "jpg"), ext).shape == (8, 8, 3)


def _npy(arr, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


class _MakesAFile:
    """Unpickling this creates a file: the proof that a reader executed pickled code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


GOOD_JPG = encode_image(np.full((8, 8, 3), 50, np.uint8), "jpg")
GOOD_NPY = _npy(np.zeros((8, 8, 3), np.uint8))


@pytest.mark.parametrize("what, data, ext", [
    ("empty", b"", "jpg"),
    ("text", b"hello, not an image", "jpg"),
    ("truncated jpg", GOOD_JPG[: len(GOOD_JPG) // 2], "jpg"),
    ("truncated png", encode_image(np.zeros((8, 8, 3), np.uint8), "png")[:40], "png"),
    ("truncated npy", GOOD_NPY[:-10], "npy"),
    ("npy of the wrong shape", _npy(np.zeros((8, 8), np.uint8)), "npy"),
    ("npy of the wrong dtype", _npy(np.zeros((8, 8, 3), np.float32)), "npy"),
    ("npy with 4 channels", _npy(np.zeros((8, 8, 4), np.uint8)), "npy"),
    ("jpg bytes named npy", GOOD_JPG, "npy"),
    ("an extension we never decode", GOOD_JPG, "pyd"),
    ("pickle", b"\x80\x04K\x01.", "pickle"),
])
def test_decode_rejects_bad_data(what, data, ext):
    with pytest.raises(ValueError):
        decode_image(data, ext)


def test_decode_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"
    data = _npy(np.array([_MakesAFile(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_image(data, "npy")
    assert not marker.exists()


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


def test_describe_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(GOOD_JPG[: len(GOOD_JPG) // 2])
    with pytest.raises(OSError) as e:
        load_rgb(bad)
    reason = describe_error(e.value)
    assert "truncated" in reason and "\n" not in reason and str(tmp_path) not in reason
