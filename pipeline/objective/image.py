"""Pixel-space image terms that are not likelihoods: the range conversion, total variation and SSIM, for
images [N, C, H, W], 1-D signals [N, C, L] and 3-D volumes [N, C, D, H, W] (the number of spatial axes is
the tensor's ndim - 2)."""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor



def to_unit_range(x: Tensor, output_range: tuple[float, float]) -> Tensor:
    """Images in output_range -> [0, 1] (float32)."""
    lo, hi = float(output_range[0]), float(output_range[1])
    x = x.float()
    return x if (lo, hi) == (0.0, 1.0) else (x - lo) / (hi - lo)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic L1 total variation per pixel, per image: [N, C, H, W] -> [N] (1-D, 3-D: _total_variation_nd).

    kornia.losses.total_variation(x, reduction='sum') gives, per (image, channel), the sum of
    |x[i+1, j] - x[i, j]| over (H-1)*W vertical pairs plus |x[i, j+1] - x[i, j]| over H*(W-1)
    horizontal pairs. We divide that by H*W and average over channels, so the value does not grow with
    the image size: a constant image gives 0, and a checkerboard of values a, b gives
    |a - b| * (H*(W-1) + (H-1)*W) / (H*W) (-> 2|a - b| for large images).
    """
    if x.dim() != 4:
        return _total_variation_nd(x)
    n, c, h, w = x.shape
    return kornia.losses.total_variation(x.float(), reduction="sum").mean(1) / (h * w)


def _total_variation_nd(x: Tensor) -> Tensor:
    """The same normalisation for 1-D [N, C, L] and 3-D [N, C, D, H, W] (kornia's is 2-D only): the sum of
    |differences of neighbours| along every spatial axis, per (sample, channel), divided by the number of
    positions, averaged over channels. A 1-D alternating signal a, b, a, ... of length L gives
    |a - b| * (L - 1) / L; a 3-D checkerboard |a - b| * 3 (S - 1) / S for a cube of side S."""
    x = x.float()
    positions = x[0, 0].numel()
    total = sum(x.diff(dim=d).abs().flatten(2).sum(2) for d in range(2, x.dim()))
    return total.mean(1) / positions


def ssim(x: Tensor, y: Tensor, window_size: int, max_val: float = 1.0) -> Tensor:
    """The SSIM map of two batches of the same shape: kornia.metrics.ssim for images, ssim3d for volumes,
    and for signals `ssim1d`, the same computation with a 1-D window. Mean it for the SSIM index."""
    if x.dim() == 4:
        return kornia.metrics.ssim(x, y, window_size, max_val=max_val)
    if x.dim() == 5:
        return kornia.metrics.ssim3d(x, y, window_size, max_val=max_val)
    return ssim1d(x, y, window_size, max_val=max_val)


def ssim1d(x: Tensor, y: Tensor, window_size: int, max_val: float = 1.0, eps: float = 1e-12) -> Tensor:
    """SSIM map of signals [N, C, L] with kornia's conventions along one axis: a sampled Gaussian window of
    sigma 1.5 (window_size taps, odd), reflected borders ('same'), c1 = (0.01 L)^2, c2 = (0.03 L)^2 with L
    = max_val, eps added to the denominator. Needs L > window_size // 2 samples."""
    c = x.shape[1]
    half = window_size // 2
    t = torch.arange(window_size, dtype=torch.float32, device=x.device) - half
    g = torch.exp(-t.square() / (2 * 1.5 ** 2))
    kernel = (g / g.sum()).to(x.dtype).view(1, 1, -1).expand(c, 1, -1)

    def blur(v: Tensor) -> Tensor:
        return F.conv1d(F.pad(v, (half, half), mode="reflect"), kernel, groups=c)

    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    mu1, mu2 = blur(x), blur(y)
    sigma1 = blur(x * x) - mu1.square()
    sigma2 = blur(y * y) - mu2.square()
    sigma12 = blur(x * y) - mu1 * mu2
    num = (2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)
    den = (mu1.square() + mu2.square() + c1) * (sigma1 + sigma2 + c2)
    return num / (den + eps)

