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


def ssim(x: Tensor, y: Tensor, window_size: int, max_val: float = 1.0, eps: float = 1e-12) -> Tensor:
    """The SSIM map of two batches of the same shape [N, C, *spatial] with 1, 2 or 3 spatial axes; mean it for
    the SSIM index. kornia's conventions (kornia.metrics.ssim / ssim3d give the same map to float32 rounding,
    tests/test_losses.py): a sampled Gaussian window of sigma 1.5 with `window_size` taps, reflected borders
    ('same' size), c1 = (0.01 L)^2, c2 = (0.03 L)^2 with L = max_val, eps added to the denominator, computed
    in float32 whatever the autocast. Needs every spatial side > window_size // 2.

    Built for the training step on a GPU, where it runs in every step: the window is made once per device
    (kornia builds it from a Python float in every call, a host-to-device copy that waits for the queue),
    and the five local moments (x, y, x², y², xy) are blurred together — one padding and one separable
    convolution per axis instead of five of each."""
    dims = x.dim() - 2
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        c = x.shape[1]
        moments = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), window_size)
        mu1, mu2, xx, yy, xy = moments.split(c, dim=1)
        c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
        mu1_mu2 = mu1 * mu2
        mu1_sq, mu2_sq = mu1.square(), mu2.square()
        num = (2.0 * mu1_mu2 + c1) * (2.0 * (xy - mu1_mu2) + c2)
        den = (mu1_sq + mu2_sq + c1) * ((xx - mu1_sq) + (yy - mu2_sq) + c2)
    assert dims in (1, 2, 3)
    return num / (den + eps)


def ssim1d(x: Tensor, y: Tensor, window_size: int, max_val: float = 1.0, eps: float = 1e-12) -> Tensor:
    """SSIM map of signals [N, C, L] (kornia has no 1-D SSIM): `ssim` along one axis."""
    return ssim(x, y, window_size, max_val, eps)


def _blur(v: Tensor, window_size: int) -> Tensor:
    """Each channel of [N, C, *spatial] convolved with the separable Gaussian window, borders reflected."""
    dims, c, half = v.dim() - 2, v.shape[1], window_size // 2
    g = gaussian_window(window_size, v.device)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    out = F.pad(v, [half] * (2 * dims), mode="reflect")
    for axis in reversed(range(dims)):  # one 1-D pass per spatial axis, the last (W) first as kornia
        shape = [1] * dims
        shape[axis] = window_size
        out = conv(out, g.view(1, 1, *shape).expand(c, 1, *shape), groups=c)
    return out


_WINDOWS: dict[tuple[int, torch.device], Tensor] = {}


def gaussian_window(window_size: int, device: torch.device, sigma: float = 1.5) -> Tensor:
    """The normalised 1-D Gaussian window (float32) on `device`, built once per (size, device): kornia's
    get_gaussian_kernel1d's values, distances measured from the nearest tap."""
    key = (window_size, torch.device(device))
    if key not in _WINDOWS:
        t = torch.arange(window_size, dtype=torch.float32) - window_size // 2
        dist = t.square() - t.square().min()
        g = torch.exp(-dist / (2 * sigma ** 2))
        _WINDOWS[key] = (g / g.sum()).to(device)
    return _WINDOWS[key]
