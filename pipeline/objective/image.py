"""Pixel-space image terms that are not likelihoods: the range conversion and total variation."""

from __future__ import annotations

import kornia
from torch import Tensor



def to_unit_range(x: Tensor, output_range: tuple[float, float]) -> Tensor:
    """Images in output_range -> [0, 1] (float32)."""
    lo, hi = float(output_range[0]), float(output_range[1])
    x = x.float()
    return x if (lo, hi) == (0.0, 1.0) else (x - lo) / (hi - lo)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic L1 total variation per pixel, per image: [N, C, H, W] -> [N].

    kornia.losses.total_variation(x, reduction='sum') gives, per (image, channel), the sum of
    |x[i+1, j] - x[i, j]| over (H-1)*W vertical pairs plus |x[i, j+1] - x[i, j]| over H*(W-1)
    horizontal pairs. We divide that by H*W and average over channels, so the value does not grow with
    the image size: a constant image gives 0, and a checkerboard of values a, b gives
    |a - b| * (H*(W-1) + (H-1)*W) / (H*W) (-> 2|a - b| for large images).
    """
    n, c, h, w = x.shape
    return kornia.losses.total_variation(x.float(), reduction="sum").mean(1) / (h * w)

