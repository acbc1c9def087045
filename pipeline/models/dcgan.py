"""`dcgan` — the DCGAN-like dog VAE (after atinghosh/VAE-pytorch): strided 4x4 convolutions down, transposed 4x4 convolutions up.

Encoder: for each width c in cfg.channels, conv4x4 stride 2 padding 1 (exactly halves H and W),
BatchNorm from the third level on (the seed's 4 levels put BN on the last two; DCGAN never
normalises the first layer), LeakyReLU(0.2). Heads:
- latent spatial: conv3x3 -> 2 x latent_channels at H/2^n (seed: 32 x 4 x 4 at 64 px). The seed used
  padding 2 then a 4x4 stride-1 conv to land on 4x4, and a LeakyReLU on mu/logvar; both dropped.
- latent vector: flatten -> Linear -> 2 x latent_dim.
Decoder: (vector only: Linear -> reshape -> BN -> ReLU), then for each width in reverse a
ConvTranspose4x4 stride 2 padding 1 -> BN -> ReLU (the seed's first one takes z directly), then
ConvTranspose3x3 stride 1 -> in_channels and the output activation (seed: sigmoid; cfg.output).
samples_per_input = L draws of z per image (the seed's no_of_sample = 10) is handled by VAE.
Init: DCGAN's N(0, 0.02) for conv weights, BN weight N(1, 0.02) and bias 0.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.models import dims as nd
from pipeline.models.base import VAE, check_common, check_levels

BN_FROM_LEVEL = 2  # levels 0 and 1 have no BatchNorm, as in the seed


class DCGANVAE(VAE):
    def __init__(self, cfg: ModelConfig, image_size: int):
        check_common(cfg, image_size, ("spatial", "vector"))
        widths, dims = list(cfg.channels), cfg.spatial_dims
        side = check_levels("model.channels", len(widths), image_size, f"model.channels has {len(widths)} levels",
                            dims)
        spatial = cfg.latent == "spatial"
        sides = (side,) * dims
        latent_shape = (cfg.latent_channels, *sides) if spatial else (cfg.latent_dim,)
        super().__init__(cfg, image_size, latent_shape)
        self.spatial = spatial
        self.feature_shape = (widths[-1], *sides)
        flat = widths[-1] * side ** dims
        conv, conv_t, norm = nd.conv(dims), nd.conv_transpose(dims), nd.batch_norm(dims)

        layers: list[nn.Module] = []
        for i, (c_in, c) in enumerate(zip([cfg.in_channels, *widths[:-1]], widths)):
            bn = i >= BN_FROM_LEVEL
            layers.append(conv(c_in, c, 4, stride=2, padding=1, bias=not bn))
            if bn:
                layers.append(norm(c))
            layers.append(nn.LeakyReLU(0.2))
        self.encoder = nn.Sequential(*layers)
        if spatial:
            self.heads = conv(widths[-1], self.posterior_width(cfg.latent_channels), 3, padding=1)
            self.decoder_input = nn.Identity()
            c_in = cfg.latent_channels
        else:
            self.heads = nn.Sequential(nn.Flatten(), nn.Linear(flat, self.posterior_width(cfg.latent_dim)))
            self.decoder_input = nn.Sequential(
                nn.Linear(cfg.latent_dim, flat, bias=False), nn.Unflatten(1, self.feature_shape),
                norm(widths[-1]), nn.ReLU())
            c_in = widths[-1]

        layers = []
        for c in widths[::-1]:
            layers += [conv_t(c_in, c, 4, stride=2, padding=1, bias=False), norm(c), nn.ReLU()]
            c_in = c
        layers.append(conv_t(c_in, cfg.in_channels, 3, stride=1, padding=1))
        self.decoder = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def encode_raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_posterior(self.heads(self.encoder(x)))

    def decode_raw(self, z: Tensor) -> Tensor:
        return self.decoder(self.decoder_input(z))


def _dcgan_init(m: nn.Module) -> None:
    if isinstance(m, nd.CONV_TYPES):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nd.BATCH_NORM_TYPES):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
