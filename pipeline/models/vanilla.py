"""`vanilla` — after AntixK/PyTorch-VAE's VanillaVAE; cfg.channels is its `hidden_dims`.

Encoder: for each width c, conv3x3 stride 2 padding 1 -> BN -> LeakyReLU (slope 0.01); flatten;
one Linear -> mu and logvar (latent_dim each).
Decoder: Linear(latent_dim -> flat) -> reshape (no activation, as in AntixK), then for the reversed
widths ConvTranspose3x3 stride 2 padding 1 output_padding 1 (exactly doubles H and W) -> BN ->
LeakyReLU into the next width, and a final ConvTranspose back to the first width followed by
conv3x3 -> in_channels and the output activation (AntixK: tanh; cfg.output). AntixK hard-codes
the 2x2 map of 64 px with 5 levels (`hidden_dims[-1] * 4`); here the map is image_size / 2^levels.
Init: PyTorch defaults (BatchNorm after every conv).
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.models import dims as nd
from pipeline.models.base import FlatLatentVAE


def _up(c_in: int, c_out: int, dims: int = 2) -> nn.Sequential:
    return nn.Sequential(
        nd.conv_transpose(dims)(c_in, c_out, 3, stride=2, padding=1, output_padding=1),
        nd.batch_norm(dims)(c_out), nn.LeakyReLU())


class VanillaVAE(FlatLatentVAE):
    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__(cfg, image_size)
        widths, flat, dims = list(cfg.channels), self.flat, cfg.spatial_dims
        conv, bn = nd.conv(dims), nd.batch_norm(dims)

        self.encoder = nn.Sequential(*[
            nn.Sequential(conv(c_in, c, 3, stride=2, padding=1), bn(c), nn.LeakyReLU())
            for c_in, c in zip([cfg.in_channels, *widths[:-1]], widths)
        ], nn.Flatten())
        self.heads = nn.Linear(flat, self.posterior_width(cfg.latent_dim))

        self.decoder_input = nn.Linear(cfg.latent_dim, flat)
        rev = widths[::-1]
        self.decoder = nn.Sequential(*[_up(c_in, c, dims) for c_in, c in zip(rev[:-1], rev[1:])])
        self.final_layer = nn.Sequential(
            _up(rev[-1], rev[-1], dims),
            conv(rev[-1], cfg.in_channels, 3, padding=1))

    def decode_raw(self, z: Tensor) -> Tensor:
        return self.final_layer(self.decoder(self.features(z)))
