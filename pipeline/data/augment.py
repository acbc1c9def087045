"""On the device: uint8 batches -> floats in the model's range, augmented when training."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DataConfig


class DeviceAugment(nn.Module):
    """uint8 [B,3,H,W] on the device -> float in the model's output range, augmented when training.

    Augmentation (data.hflip, data.rotation_degrees): a random half of the batch mirrored left-right, then
    each image rotated about its centre by an angle drawn uniformly from ±rotation_degrees, bilinear, the
    corners filled with black — kornia's RandomHorizontalFlip + RandomRotation (align_corners=True), as one
    affine warp: the flip is the sign of the matrix's first row. A dozen kernels per batch where kornia's
    modules launched about seventy (matrix helpers, eye/repeat/cross products) in every training step.
    The draws use torch's global RNG of the images' device, the RNG that a checkpoint saves and restores, so
    augmentation replays exactly on resume.

    Array shards (data_range given: the manifest's normalization): float32 [B, C, L] or [B, C, D, H, W]
    in the data's units -> (x - low) / (high - low) clipped to [0, 1] -> the output range; data.hflip
    reverses the last axis (time; W of a volume) of a random half of the batch. Rotation is 2-D only (the
    config refuses it for other dims)."""

    def __init__(self, cfg: DataConfig, output_range: tuple[float, float],
                 data_range: tuple[float, float] | None = None):
        super().__init__()
        self.data_range = data_range
        self.hflip = cfg.hflip
        self.rotation_radians = math.radians(cfg.rotation_degrees)
        self.low, self.high = float(output_range[0]), float(output_range[1])

    def forward(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if self.data_range is not None:
            lo, hi = self.data_range
            x = ((images.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
        else:
            x = images.float() / 255.0  # [0, 1]
        if train and self.rotation_radians > 0:
            x = self._flip_and_rotate(x)
        elif train and self.hflip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
        return x * (self.high - self.low) + self.low

    def _flip_and_rotate(self, x: torch.Tensor) -> torch.Tensor:
        """out = rotate(hflip?(x)) as one grid_sample. The affine grid maps output to input coordinates in
        [-1, 1] (align_corners=True: ±1 are the corner pixels' centres, the centre of rotation is the image's
        centre as kornia's, positive angles counter-clockwise); r corrects the rotation for non-square images."""
        b, _, h, w = x.shape
        sign = 1.0 - 2.0 * (torch.rand(b, device=x.device) < 0.5).float() if self.hflip else 1.0
        angle = (torch.rand(b, device=x.device) * 2 - 1) * self.rotation_radians
        cos, sin = angle.cos(), angle.sin()
        r = (h - 1) / max(w - 1, 1)
        zero = torch.zeros_like(cos)
        theta = torch.stack([sign * cos, -sign * sin * r, zero, sin / r, cos, zero], dim=1).view(b, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
