"""On the device: uint8 batches -> floats in the model's range, augmented when training."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DataConfig


class DeviceAugment(nn.Module):
    """uint8 [B,3,H,W] on the device -> float in the model's output range, augmented when training.

    kornia draws its parameters with torch's global RNG of the images' device, the RNG that
    Accelerate saves and restores with a checkpoint, so augmentation replays exactly on resume.

    Array shards (data_range given: the manifest's normalization): float32 [B, C, L] or [B, C, D, H, W]
    in the data's units -> (x - low) / (high - low) clipped to [0, 1] -> the output range; data.hflip
    reverses the last axis (time; W of a volume) of a random half of the batch, drawn from the same
    global RNG. Rotation is 2-D only (the config refuses it for other dims)."""

    def __init__(self, cfg: DataConfig, output_range: tuple[float, float],
                 data_range: tuple[float, float] | None = None):
        super().__init__()
        import kornia.augmentation as K  # imported here: workers and readers never need kornia

        self.data_range = data_range
        self.hflip = cfg.hflip
        augs: list[nn.Module] = []
        if cfg.hflip and data_range is None:  # (arrays flip in _arrays: kornia's flips are 2-D/3-D only)
            augs.append(K.RandomHorizontalFlip(p=0.5))
        if cfg.rotation_degrees > 0:
            augs.append(K.RandomRotation(degrees=cfg.rotation_degrees, p=1.0))  # corners fill with black
        self.augment = nn.Sequential(*augs)
        self.low, self.high = float(output_range[0]), float(output_range[1])

    def forward(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if self.data_range is not None:
            return self._arrays(images, train)
        x = images.float() / 255.0  # [0, 1]; kornia works on floats
        if train and len(self.augment):
            for aug in self.augment:  # sample on the images' device (also without a .to(device))
                if aug.device != x.device:
                    aug.set_rng_device_and_dtype(x.device, x.dtype)
            x = self.augment(x)
        return x * (self.high - self.low) + self.low

    def _arrays(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        lo, hi = self.data_range
        x = ((x.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
        if train and self.hflip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5  # the device's global RNG, like kornia's
            x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
        return x * (self.high - self.low) + self.low
