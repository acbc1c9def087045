"""Arrays as samples (model.spatial_dims 1 or 3): reading `.npy` and `.wav` files, checking them, and
turning them into one float32 [C, *spatial] sample each. Used by pipeline.shards in array mode
(`--spatial-dims 1|3`) and by the readers.

    arr = load_array(path)                        # np.ndarray, or ValueError with a short reason
    sample = to_sample(arr, spatial_dims=1)       # float32 [C, L]; ValueError when it does not fit

Files:
- `.npy`: read with np.load(..., allow_pickle=False) always (an object array is refused, never
  unpickled); numeric dtypes only (bool, integers, floats; not complex, object, strings or records).
- `.wav` (1-D only): PCM 8/16/24/32-bit integer samples through Python's `wave` module (no extra
  dependency; float, compressed or extensible-format files are refused with the reason), scaled to
  full scale [-1, 1) as soundfile and librosa do (16-bit: / 32768; 8-bit is unsigned, centred at 128).

Channels: an array with spatial_dims axes is one channel ([L] -> [1, L], [D, H, W] -> [1, D, H, W]);
one with spatial_dims + 1 axes is channels-first ([C, L], [C, D, H, W]) unless `channels_last`
(`--channels-last`: [L, C], [D, H, W, C]). A `.wav` is [frames, channels] and always becomes [C, L].
NaN or inf anywhere refuses the file.
"""

from __future__ import annotations

import hashlib
import io
import wave
from pathlib import Path

import numpy as np

ARRAY_EXTENSIONS = {1: frozenset({".npy", ".wav"}), 3: frozenset({".npy"})}


def _numeric(arr: np.ndarray) -> None:
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"dtype {arr.dtype} is not numeric (bool, integer or float arrays only)")


def read_npy(data: bytes) -> np.ndarray:
    """Bytes of a .npy file -> the array; never unpickles. ValueError with a short reason."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ValueError("pickled Python objects (an object array or a pickle), which are never unpickled; store numbers") from None
        raise ValueError(f"not a readable .npy file ({str(e).splitlines()[0][:80]})") from None
    except Exception as e:  # noqa: BLE001 - truncated header/data
        raise ValueError(f"not a readable .npy file ({type(e).__name__})") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError("not a single array")
    _numeric(arr)
    return arr


def read_wav(data: bytes) -> np.ndarray:
    """Bytes of a PCM .wav -> float64 [frames, channels] in full scale [-1, 1)."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            width, channels, frames = w.getsampwidth(), w.getnchannels(), w.getnframes()
            raw = w.readframes(frames)
    except (wave.Error, EOFError) as e:
        raise ValueError(f"not a PCM .wav file the wave module reads ({str(e)[:80]})") from None
    if len(raw) != frames * width * channels:
        raise ValueError(f"truncated .wav ({len(raw)} of {frames * width * channels} data bytes)")
    if width == 1:
        pcm = np.frombuffer(raw, np.uint8).astype(np.int32) - 128
    elif width == 2:
        pcm = np.frombuffer(raw, "<i2").astype(np.int32)
    elif width == 3:  # little-endian 24-bit: sign-extend into int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        pcm = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8
    elif width == 4:
        pcm = np.frombuffer(raw, "<i4").astype(np.int32)
    else:
        raise ValueError(f"{8 * width}-bit .wav samples are not supported (8, 16, 24 or 32-bit PCM)")
    return pcm.reshape(frames, channels) / float(2 ** (8 * width - 1))


def load_array(path: str | Path) -> tuple[np.ndarray, str]:
    """A file -> (array, content key: sha256 of its dtype, shape and values, independent of any option)."""
    data = Path(path).read_bytes()
    if not data:
        raise ValueError("empty file (0 bytes)")
    arr = read_wav(data) if str(path).lower().endswith(".wav") else read_npy(data)
    c = np.ascontiguousarray(arr)
    key = hashlib.sha256(f"array:{c.dtype.str}:{c.shape}:".encode() + c.tobytes()).hexdigest()
    return arr, key


def to_sample(arr: np.ndarray, spatial_dims: int, channels_last: bool = False, wav: bool = False) -> np.ndarray:
    """An array -> float32 [C, *spatial] (see the module docstring); ValueError when it does not fit."""
    if wav:
        arr = arr.T  # [frames, channels] -> [C, L]
    elif arr.ndim == spatial_dims:
        arr = arr[None]
    elif arr.ndim == spatial_dims + 1:
        arr = np.moveaxis(arr, -1, 0) if channels_last else arr
    else:
        want = "[L] or [C, L]" if spatial_dims == 1 else "[D, H, W] or [C, D, H, W]"
        raise ValueError(f"shape {tuple(arr.shape)} has {arr.ndim} axes; {spatial_dims}-D samples are {want}")
    if 0 in arr.shape:
        raise ValueError(f"shape {tuple(arr.shape)} is empty")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError("holds NaN or inf values (or values beyond float32)")
    return out


def header_shape(path: str | Path, spatial_dims: int, channels_last: bool) -> tuple[int, ...] | None:
    """The [C, *spatial] shape a file would give, from its header only (cheap); None when unreadable."""
    try:
        if str(path).lower().endswith(".wav"):
            with wave.open(str(path)) as w:
                return (w.getnchannels(), w.getnframes())
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
    except Exception:  # noqa: BLE001 - the full read reports the reason
        return None
    if len(shape) == spatial_dims:
        return (1, *shape)
    if len(shape) == spatial_dims + 1:
        return (shape[-1], *shape[:-1]) if channels_last else tuple(shape)
    return None


def encode_npy(sample: np.ndarray) -> bytes:
    """float32 array -> .npy bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, sample, allow_pickle=False)
    return buf.getvalue()


def decode_sample(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A stored sample's .npy bytes -> writable float32 array of exactly `shape`; ValueError otherwise."""
    arr = read_npy(data)
    if arr.dtype != np.float32 or tuple(arr.shape) != tuple(shape):
        raise ValueError(f"stored sample is {arr.dtype} {tuple(arr.shape)}, the manifest says float32 {tuple(shape)}")
    return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr)
