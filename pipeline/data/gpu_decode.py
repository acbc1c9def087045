"""data.decode=gpu: the data workers only read the stored JPEG bytes (and check their headers); the
training process decodes each batch on the GPU with nvJPEG (torchvision.io.decode_jpeg, device="cuda",
one call per batch), which frees the CPU cores for everything else.

    device = decode_device(cfg.data.decode, manifest["image_format"])   # None: decode on the CPU
    images = decode_batch(list_of_jpeg_bytes, device)                   # uint8 [B, 3, H, W] on device

`auto` uses the GPU when there is one and the shards store JPEG, and falls back to the CPU workers
otherwise; `gpu` refuses, in one sentence, where it cannot run. nvJPEG's pixels may differ from
libjpeg's in the last bit: a run resumes exactly as long as it keeps the same data.decode.
"""

from __future__ import annotations

import io
import logging
import warnings

import torch
from PIL import Image

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

SETTINGS = ("cpu", "gpu", "auto")


def decode_device(setting: str, image_format: str) -> str | None:
    """data.decode -> None (the data workers decode on the CPU) or "cuda" (the batch is decoded there).
    Raises ConfigError (one sentence) for data.decode=gpu where that cannot run."""
    if setting == "cpu":
        return None
    if image_format != "jpg":
        reason = f"the shards store {image_format} images and only JPEG is decoded on the GPU"
    elif not torch.cuda.is_available():
        reason = "this machine has no CUDA device (torch.cuda.is_available() is False)"
    else:
        return "cuda"
    if setting == "auto":
        log.info("data.decode=auto: decoding on the CPU, as %s", reason)
        return None
    raise ConfigError(f"data.decode=gpu cannot be used: {reason}; set data.decode=cpu, or auto to fall back to "
                      f"the CPU where the GPU cannot decode")


def jpeg_header_ok(data: bytes, size: int) -> bool:
    """What a worker checks before handing raw bytes on: a JPEG of size x size in RGB or grey (the
    header only; a sample whose coded data is broken fails in decode_batch, naming its key)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return img.format == "JPEG" and img.size == (size, size) and img.mode in ("RGB", "L")
    except Exception:  # noqa: BLE001 - not an image: a bad sample
        return False


def decode_batch(blobs: list[bytes], device: str | torch.device, keys: list[str] | None = None) -> torch.Tensor:
    """JPEG bytes -> uint8 [B, 3, H, W] on `device`, decoded there in one batched call."""
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they still work
        # and are what nvJPEG batch decoding is reached through with the pinned torch.
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        first = f" (one of {keys[0]} ... {keys[-1]})" if keys else ""
        raise RuntimeError(f"decoding a batch of stored JPEGs on {device} failed{first}: {str(e).splitlines()[0]}; "
                           f"run `make verify` on the shards, or train with data.decode=cpu, which skips "
                           f"undecodable samples") from None
    return torch.stack(images)
