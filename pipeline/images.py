"""The one code path for image files: reading user images, resizing, and the stored sample format.

`pipeline.shards` (writing), `pipeline.data` (decoding shard members) and sample/evaluate (reading a
user's own images) all go through these functions, so an image looks the same wherever it enters.

    arr = load_image("photo.jpg", 128)           # uint8 [128, 128, 3]: EXIF-rotated, RGB, cropped
    data = encode_image(arr, "jpg", quality=95)  # bytes as stored in a shard
    arr2 = decode_image(data, "jpg")             # uint8 [128, 128, 3]; ValueError if corrupt
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps

try:
    from PIL import ImageCms
except ImportError:  # a Pillow built without littlecms: CMYK falls back to the plain formula
    ImageCms = None

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""Source file extensions treated as images (lower-case, with the dot; matching ignores case)."""

STORED_FORMATS: tuple[str, ...] = ("jpg", "png", "webp", "npy")
"""Formats an image can be stored as inside a shard (the tar member's extension)."""

BACKGROUND_RGB: tuple[int, int, int] = (255, 255, 255)
"""Transparent pixels are composited onto this fixed colour (white, like a browser page)."""

# A truncated file must fail loudly, never come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_SRGB = None


def _srgb_profile():
    global _SRGB
    if _SRGB is None:
        _SRGB = ImageCms.createProfile("sRGB")
    return _SRGB


def _scale_to_uint8(arr: np.ndarray, full_scale: float) -> np.ndarray:
    scaled = np.clip(arr.astype(np.float64) * (255.0 / full_scale), 0, 255)
    return np.rint(scaled).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and 32-bit greys scaled (not clipped), CMYK through its
    ICC profile when it has one, transparency composited onto BACKGROUND_RGB."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greys (PNG, TIFF): 65535 is white. Pillow's own convert("L") clips at 255.
        return Image.fromarray(_scale_to_uint8(np.asarray(img), 65535.0), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        full = 1.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 255.0
        return Image.fromarray(_scale_to_uint8(np.nan_to_num(arr), full), "L").convert("RGB")
    if mode == "CMYK":
        icc = img.info.get("icc_profile")
        if icc and ImageCms is not None:
            try:
                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                return ImageCms.profileToProfile(img, src, _srgb_profile(), outputMode="RGB")
            except (ImageCms.PyCMSError, OSError, ValueError):
                pass  # a broken profile: fall back to the plain formula below
        return img.convert("RGB")
    if mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, YCbCr, HSV, ...


def _open_rgb(path: str | Path) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, (width, height) as displayed). Raises OSError / ValueError on a bad file."""
    with warnings.catch_warnings():
        # Pillow warns about odd-but-readable files (corrupt EXIF, palette transparency, ...);
        # the outcome is either a good RGB image or an exception, so the warnings are noise.
        warnings.simplefilter("ignore")
        with Image.open(path) as img:
            img.load()  # decode now: truncation and corrupt data raise here, inside the `with`
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # an unreadable orientation tag: keep the pixels as stored
                pass
            rgb = to_rgb(img)
    return rgb, rgb.size


def load_rgb(path: str | Path) -> Image.Image:
    """Read an image file as 8-bit RGB, EXIF orientation applied. Raises OSError/ValueError if bad."""
    return _open_rgb(path)[0]


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """The central square (side = the shorter side; offset rounded down) resized to size x size ->
    uint8 [size, size, 3], in one antialiased bicubic resize (Pillow's filter: a = -0.5, support
    scaled with the reduction) through torch's uint8 kernel: 4-6x faster than Pillow's Lanczos, and
    the same bytes on every CPU (its AVX2 and generic kernels agree exactly; tests/test_images.py).
    Bicubic, as open_clip, ADM and LlamaGen resize their training images."""
    import torch  # here, not at the top: `python -m pipeline.shards verify` and --help need no torch
    import torch.nn.functional as F

    arr = np.asarray(img)
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = arr[top:top + side, left:left + side].copy()  # contiguous and writable (torch shares it)
    if side == size:
        return crop
    # An NCHW view of the HWC memory, with a batch stride torch recognises as channels_last (the [None]
    # of numpy or torch gives stride 0 or 3): the kernel reads it and writes its output in that layout,
    # so the result is HWC without a transposing copy (~75 us of a ~150 us resize otherwise).
    x = torch.from_numpy(crop.reshape(1, side, side, 3)).permute(0, 3, 1, 2)
    out = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())  # (a copy only if torch changes layouts)


class Loaded(NamedTuple):
    """What load_rgb_reduced read: the image and what the source file was."""

    image: Image.Image
    """RGB, EXIF-rotated; a JPEG possibly decoded at a reduced scale (see load_rgb_reduced)."""
    width: int
    """Displayed width of the full-size image (after EXIF orientation), in px."""
    height: int
    """Displayed height of the full-size image, in px."""
    format: str | None
    """Pillow's name of the file format ("JPEG", "PNG", ...)."""
    orientation: int
    """The EXIF orientation tag (1 when absent): a JPEG's displayed pixels depend on it."""


def load_rgb_reduced(source: str | Path | io.BytesIO, size: int) -> Loaded:
    """load_rgb for an image about to be resized to `size` (shorter side): a JPEG is decoded at the
    smallest of libjpeg's DCT scales (1/2, 1/4, 1/8) that keeps both sides at least as large as the
    resize needs (Pillow's `draft`), which skips most of the IDCT and leaves a small final resize;
    other formats are decoded at full size. Raises OSError / ValueError on a bad file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # see _open_rgb
        with Image.open(source) as img:
            full, fmt = img.size, img.format
            if fmt == "JPEG" and size > 0:
                scale = size / min(full)
                img.draft(None, (math.ceil(full[0] * scale), math.ceil(full[1] * scale)))
            img.load()
            stored, orientation = img.size, 1
            try:
                orientation = int(img.getexif().get(0x0112, 1))
                ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is nothing to do
            except Exception:  # an unreadable orientation tag: keep the pixels as stored
                pass
            swapped = img.size != stored
            rgb = to_rgb(img)
    return Loaded(rgb, *(full[::-1] if swapped else full), fmt, orientation)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """A user's image as `make shards` stores it: load_rgb_reduced + resize_center_crop -> uint8
    [size, size, 3]."""
    return resize_center_crop(load_rgb_reduced(path, size).image, size)


def _norm_ext(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def encode_image(arr: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """uint8 [H, W, 3] -> bytes in `fmt` (jpg | png | webp | npy). Deterministic for a given Pillow."""
    fmt = _norm_ext(fmt)
    _check_array(arr)
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        return buf.getvalue()
    img = Image.fromarray(arr, "RGB")
    if fmt == "jpg":
        # 4:4:4 at high quality: chroma subsampling costs visible colour detail at 64-256 px.
        img.save(buf, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "png":
        img.save(buf, "PNG", compress_level=3)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, lossless=quality >= 100, method=4)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use one of {', '.join(STORED_FORMATS)}")
    return buf.getvalue()


def _check_array(arr: np.ndarray) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        desc = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise ValueError(f"expected a uint8 HxWx3 array, got {desc}")


def decode_image(data: bytes, ext: str) -> np.ndarray:
    """Stored bytes -> writable uint8 [H, W, 3]. Never unpickles. ValueError with a short reason on
    corrupt data, an unknown extension, or a wrong shape/dtype."""
    fmt = _norm_ext(ext)
    if fmt not in STORED_FORMATS:
        raise ValueError(f"unsupported image extension {ext!r}")
    if not data:
        raise ValueError("empty image data")
    if fmt == "npy":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:  # truncated header/data, pickled object arrays, ...
            raise ValueError(f"corrupt npy data ({_short(e)})") from None
        if not isinstance(arr, np.ndarray):
            raise ValueError("npy data is not a single array")
        _check_array(arr)
        return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                img = to_rgb(img)
    except Exception as e:
        raise ValueError(f"corrupt {fmt} data ({_short(e)})") from None
    return np.array(img, dtype=np.uint8)


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:160] if text else type(e).__name__


def describe_error(e: BaseException) -> str:
    """A one-line, path-free reason for a file that failed to load (for manifest["skipped"])."""
    if isinstance(e, Image.DecompressionBombError):
        return "image too large (Pillow decompression-bomb limit)"
    if isinstance(e, Image.UnidentifiedImageError):
        return "not a readable image (unknown format or corrupt header)"
    text = str(e).splitlines()[0] if str(e) else ""
    if "truncated" in text.lower():
        return f"truncated image data ({text})"
    if isinstance(e, (OSError, SyntaxError, EOFError)):
        return f"corrupt image data ({text or type(e).__name__})"
    return _short(e)
