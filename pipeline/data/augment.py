"""On the device: uint8 batches -> floats in the model's range, augmented when training."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DataConfig


class DeviceAugment(nn.Module):
    """uint8 [B,3,H,W] on the device -> float in the model's output range, augmented when training.

    kornia draws its parameters with torch's global RNG of the images' device, the RNG that
    Accelerate saves and restores with a checkpoint, so augmentation replays exactly on resume."""

    def __init__(self, cfg: DataConfig, output_range: tuple[float, float]):
        super().__init__()
        import kornia.augmentation as K  # imported here: workers and readers never need kornia

        augs: list[nn.Module] = []
        if cfg.hflip:
            augs.append(K.RandomHorizontalFlip(p=0.5))
        if cfg.rotation_degrees > 0:
            augs.append(K.RandomRotation(degrees=cfg.rotation_degrees, p=1.0))  # corners fill with black
        self.augment = nn.Sequential(*augs)
        self.low, self.high = float(output_range[0]), float(output_range[1])

    def forward(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = images.float() / 255.0  # [0, 1]; kornia works on floats
        if train and len(self.augment):
            for aug in self.augment:  # sample on the images' device (also without a .to(device))
                if aug.device != x.device:
                    aug.set_rng_device_and_dtype(x.device, x.dtype)
            x = self.augment(x)
        return x * (self.high - self.low) + self.low
