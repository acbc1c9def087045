"""`conv` — the flowers conv VAE: double-conv Down/Up blocks and a flat vector latent.

Encoder: for each width c in cfg.channels, Down(c_prev, c, c) then GELU, where
    Down = conv3x3 -> BN -> GELU -> conv3x3 -> BN -> 2x2 max-pool.
The final feature map (channels[-1] x H/2^n x W/2^n; 1-D and 3-D: the same with Conv1d/Conv3d) is flattened and one Linear gives mu and logvar
(the seed's head predicted exp(std); a log-variance head is the textbook, numerically safe form).
Decoder: Linear(latent_dim -> flat) -> GELU -> reshape, then Up blocks mirroring the widths,
    Up = BN -> GELU -> bilinear x2 -> conv3x3 -> BN -> GELU -> conv3x3,
the last Up ending in in_channels, then tanh or sigmoid (cfg.output). The seed's 6 levels
[8, 16, 32, 64, 128, 256] at 256 px gave 256x4x4 = 4096 features; at 128 px they give 256x2x2.
Init: PyTorch defaults (BatchNorm after every conv keeps the activations scaled).
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.models import dims as nd
from pipeline.models.base import FlatLatentVAE


class Down(nn.Sequential):
    def __init__(self, c_in: int, c_mid: int, c_out: int, dims: int = 2):
        conv, bn = nd.conv(dims), nd.batch_norm(dims)
        super().__init__(
            conv(c_in, c_mid, 3, padding=1), bn(c_mid), nn.GELU(),
            conv(c_mid, c_out, 3, padding=1), bn(c_out),
            nd.max_pool(dims)(2),
        )


class Up(nn.Sequential):
    def __init__(self, c_in: int, c_mid: int, c_out: int, dims: int = 2):
        conv, bn = nd.conv(dims), nd.batch_norm(dims)
        super().__init__(
            bn(c_in), nn.GELU(),
            nn.Upsample(scale_factor=2, mode=nd.interpolate_mode(dims), align_corners=True),
            conv(c_in, c_mid, 3, padding=1), bn(c_mid), nn.GELU(),
            conv(c_mid, c_out, 3, padding=1),
        )


class ConvVAE(FlatLatentVAE):
    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__(cfg, image_size)
        widths, flat = list(cfg.channels), self.flat

        layers: list[nn.Module] = []
        for c_in, c in zip([cfg.in_channels, *widths[:-1]], widths):
            layers += [Down(c_in, c, c, cfg.spatial_dims), nn.GELU()]
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.heads = nn.Linear(flat, self.posterior_width(cfg.latent_dim))  # mu and logvar side by side

        self.decoder_input = nn.Sequential(nn.Linear(cfg.latent_dim, flat), nn.GELU())
        rev = widths[::-1]
        outs = [*rev[1:], cfg.in_channels]
        self.decoder = nn.Sequential(*[Up(c, c, c_out, cfg.spatial_dims) for c, c_out in zip(rev, outs)])

    def decode_raw(self, z: Tensor) -> Tensor:
        return self.decoder(self.features(z))
