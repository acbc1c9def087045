"""`resnet` — latent-diffusion (LDM) style: GroupNorm+SiLU ResNet blocks, self-attention,
a spatial latent latent_channels x H/f x W/f.

Two ways to configure it, both compiled to one list of typed blocks and checked by shape inference:

1. Levels (LDM's AutoencoderKL): cfg.channels = width per level, cfg.blocks_per_level,
   cfg.attention_levels; f = 2^(levels-1).
   encoder: conv3x3 -> channels[0]; per level i: blocks_per_level ResNet blocks (each followed by
            attention when i is in attention_levels), a stride-2 downsample except after the last;
            middle: ResNet, attention (when the last level is in attention_levels: LDM's only
            attention in its f8 VAE sits here), ResNet; GroupNorm+SiLU; conv3x3 -> 2 x latent_channels.
   decoder: conv3x3 latent_channels -> channels[-1]; middle as above; per level, deepest first:
            blocks_per_level + 1 ResNet blocks (+attention), nearest x2 + conv3x3 upsample except
            after level 0; GroupNorm+SiLU.
   channels [128, 256, 512, 512], blocks_per_level 2, attention_levels [3], latent_channels 4 is
   LDM's kl-f8 (Stable Diffusion's VAE) and has its 83,653,863 parameters (a test pins this).

2. Explicit lists (a "structure file" of typed blocks, as YAML), cfg.encoder / cfg.decoder of
   BlockSpec(block, out, repeat), block one of:
     resnet (out channels, 1x1 skip when they change), attention (single head, keeps channels),
     downsample (conv3x3 stride 2, keeps channels; cfg.downsample_padding: symmetric pads one pixel on every
     side, ldm pads right and bottom only, as LDM and diffusers do), upsample (nearest x2 + conv3x3, keeps channels),
     conv (conv3x3 to out channels), norm_act (GroupNorm + SiLU, keeps channels), quantize (looks every
     position's channel vector up in a codebook, model.quantizer's kind and settings, its own codebook of
     codebook_size codes; keeps channels: intermediate-layer quantization);
   out = 0 keeps the incoming channel count; repeat stacks the block.
   How the lists meet the latent: the encoder list starts from the image (in_channels channels);
   whatever it ends with goes through the head. The decoder list starts from z (latent_channels
   channels), so its first entry is usually `conv` or `resnet` with the working width; the output
   conv follows it. Either list may be given alone; the other side then comes from the levels.

Around both: the head is a 1x1 conv to 2 x latent_channels split into mu and logvar (LDM's
quant_conv); the decoder starts with a 1x1 conv latent_channels -> latent_channels (post_quant_conv)
and ends with conv3x3 -> in_channels and the output activation. GroupNorm uses 32 groups when 32
divides the channels, otherwise gcd(32, channels) groups (so tiny test widths work). Errors name the
list index: "model.decoder[3] (upsample) ...". Init: PyTorch defaults, as in LDM.
"""

from __future__ import annotations

import difflib
import math

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import BLOCK_NAMES, BlockSpec, ConfigError, ModelConfig, QuantizerConfig
from pipeline.models import dims as nd
from pipeline.models.base import VAE, check_common, check_levels, group_count
from pipeline.models.quantize import QuantizeBlock

KEEPS_CHANNELS = ("attention", "downsample", "upsample", "norm_act", "quantize")


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(c), c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dims: int = 2):
        super().__init__()
        conv = nd.conv(dims)
        self.norm1, self.conv1 = _norm(c_in), conv(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), conv(c_out, c_out, 3, padding=1)
        self.skip = conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the flattened positions (H*W; L in 1-D, D*H*W in 3-D; LDM's
    AttnBlock), via SDPA."""

    def __init__(self, c: int, dims: int = 2):
        super().__init__()
        conv = nd.conv(dims)
        self.norm = _norm(c)
        self.qkv = conv(c, 3 * c, 1)  # LDM's q, k, v 1x1 convs, fused (same parameters)
        self.proj = conv(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        n = math.prod(spatial)
        qkv = self.qkv(self.norm(x)).reshape(b, 3, 1, c, n).transpose(-1, -2)  # [B, 3, heads=1, positions, C]
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, *spatial))


class Downsample(nn.Module):
    def __init__(self, c: int, padding: str = "symmetric", dims: int = 2):
        super().__init__()
        self.ldm = padding == "ldm"  # the same parameters either way: a checkpoint's keys do not depend on it
        self.pad = (0, 1) * dims  # ldm: one zero at the end of every spatial axis (right and bottom in 2-D)
        self.conv = nd.conv(dims)(c, c, 3, stride=2, padding=0 if self.ldm else 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.pad) if self.ldm else x)


class Upsample(nn.Module):
    def __init__(self, c: int, dims: int = 2):
        super().__init__()
        self.conv = nd.conv(dims)(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _make(block: str, c_in: int, c_out: int, downsample_padding: str = "symmetric", dims: int = 2) -> nn.Module:
    if block == "resnet":
        return ResnetBlock(c_in, c_out, dims)
    if block == "attention":
        return AttentionBlock(c_in, dims)
    if block == "downsample":
        return Downsample(c_in, downsample_padding, dims)
    if block == "upsample":
        return Upsample(c_in, dims)
    if block == "conv":
        return nd.conv(dims)(c_in, c_out, 3, padding=1)
    return nn.Sequential(_norm(c_in), nn.SiLU())  # norm_act


# ----------------------------------------------------------------------------------------------
# Levels -> block lists (LDM's layout)
# ----------------------------------------------------------------------------------------------


def level_specs(cfg: ModelConfig, side: str) -> list[BlockSpec]:
    ch, attn, last = list(cfg.channels), set(cfg.attention_levels), len(cfg.channels) - 1

    def level(i: int, n: int) -> list[BlockSpec]:
        if i in attn and i != last:
            return [BlockSpec("resnet", ch[i]), BlockSpec("attention")] * n
        return [BlockSpec("resnet", ch[i], n)]

    middle = [BlockSpec("resnet", ch[-1]), *([BlockSpec("attention")] if last in attn else []),
              BlockSpec("resnet", ch[-1])]
    specs: list[BlockSpec] = []
    if side == "encoder":
        specs.append(BlockSpec("conv", ch[0]))
        for i in range(len(ch)):
            specs += level(i, cfg.blocks_per_level)
            if i != last:
                specs.append(BlockSpec("downsample"))
        heads = 1 if cfg.quantizer.kind != "none" and cfg.quantizer.latent else 2  # z_e alone, or mu and logvar
        return specs + middle + [BlockSpec("norm_act"), BlockSpec("conv", heads * cfg.latent_channels)]
    specs += [BlockSpec("conv", ch[-1]), *middle]
    for i in reversed(range(len(ch))):
        specs += level(i, cfg.blocks_per_level + 1)
        if i != 0:
            specs.append(BlockSpec("upsample"))
    return specs + [BlockSpec("norm_act")]


def _check_levels_cfg(cfg: ModelConfig, image_size: int) -> None:
    n = len(cfg.channels)
    if cfg.blocks_per_level < 1:
        raise ConfigError(f"model.blocks_per_level must be at least 1, got {cfg.blocks_per_level}")
    for i, level in enumerate(cfg.attention_levels):
        if not 0 <= level < n:
            raise ConfigError(f"model.attention_levels[{i}] is {level}, but model.channels has {n} levels "
                              f"(0..{n - 1})")
    check_levels("model.channels", n - 1, image_size,
                 f"model.channels has {n} levels ({n - 1} downsamples)", cfg.spatial_dims)


# ----------------------------------------------------------------------------------------------
# Block list -> modules, with shape inference and errors naming the index
# ----------------------------------------------------------------------------------------------


def _build_stack(specs: list[BlockSpec], side: str, c: int, size: int, image_size: int,
                 explicit: bool, downsample_padding: str = "symmetric",
                 quantizer: QuantizerConfig | None = None, dims: int = 2) -> tuple[nn.Sequential, int, int]:
    """Build `specs` from c channels at size px (per spatial axis); return (modules, channels out, size out)."""
    noun, unit = nd.size_words(dims)
    n_down = sum(s.repeat for s in specs if s.block == "downsample")
    modules: list[nn.Module] = []
    for i, spec in enumerate(specs):
        where = f"model.{side}[{i}] ({spec.block})" if explicit else f"the {side} built from model.channels"
        if spec.block not in BLOCK_NAMES:
            close = difflib.get_close_matches(spec.block, BLOCK_NAMES, n=1)
            hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(BLOCK_NAMES)}"
            raise ConfigError(f"model.{side}[{i}] has unknown block {spec.block!r}; {hint}")
        if spec.repeat < 1:
            raise ConfigError(f"{where} has repeat {spec.repeat}; it must be at least 1")
        if spec.out < 0:
            raise ConfigError(f"{where} has out {spec.out}; give a channel count, or 0 to keep {c}")
        if spec.block in KEEPS_CHANNELS and spec.out not in (0, c):
            raise ConfigError(f"{where} keeps its {c} input channels, so out must be 0 or {c}, not {spec.out}; "
                              f"change channels with a resnet or conv block before it")
        if spec.block == "quantize" and (quantizer is None or quantizer.kind == "none"):
            raise ConfigError(f"{where} quantizes, but model.quantizer.kind is none; set it to vq, ema or fsq")
        if spec.codebook_size < 0 or (spec.codebook_size and spec.block != "quantize"):
            raise ConfigError(f"{where} has codebook_size {spec.codebook_size}; only quantize blocks take one "
                              f"(a positive number, or 0 for model.quantizer.codebook_size)")
        for r in range(spec.repeat):
            c_out = spec.out or c
            if spec.block == "quantize":
                name = f"{side}.{i}" + (f".{r}" if spec.repeat > 1 else "")
                modules.append(QuantizeBlock(quantizer, c, name, spec.codebook_size))
                continue
            if spec.block == "downsample":
                if size % 2:
                    raise ConfigError(
                        f"{where} gets a {size} {unit} feature map, which a stride-2 downsample cannot halve; "
                        f"with {n_down} downsample blocks the {noun} must be divisible by {2 ** n_down}, "
                        f"but the shards are {image_size} {unit}")
                size //= 2
            elif spec.block == "upsample":
                size *= 2
            modules.append(_make(spec.block, c, c_out, downsample_padding, dims))
            c = c_out
    return nn.Sequential(*modules), c, size


class ResNetVAE(VAE):
    def __init__(self, cfg: ModelConfig, image_size: int):
        check_common(cfg, image_size, ("spatial",))
        if not (cfg.encoder and cfg.decoder):
            _check_levels_cfg(cfg, image_size)
        lc, dims = cfg.latent_channels, cfg.spatial_dims
        conv = nd.conv(dims)
        enc_specs = cfg.encoder or level_specs(cfg, "encoder")
        encoder, c_enc, side = _build_stack(enc_specs, "encoder", cfg.in_channels, image_size, image_size,
                                            explicit=bool(cfg.encoder), downsample_padding=cfg.downsample_padding,
                                            quantizer=cfg.quantizer, dims=dims)
        super().__init__(cfg, image_size, (lc, *[side] * dims))
        self.encoder = encoder
        self.heads = conv(c_enc, self.posterior_width(lc), 1)

        dec_specs = cfg.decoder or level_specs(cfg, "decoder")
        self.decoder_input = conv(lc, lc, 1)
        self.decoder, c_dec, out_size = _build_stack(dec_specs, "decoder", lc, side, image_size,
                                                     explicit=bool(cfg.decoder), quantizer=cfg.quantizer, dims=dims)
        if out_size != image_size:
            ups = [i for i, s in enumerate(dec_specs) if s.block == "upsample"]
            n_up = sum(dec_specs[i].repeat for i in ups)
            n_down = sum(s.repeat for s in enc_specs if s.block == "downsample")
            enc = "model.encoder" if cfg.encoder else "model.channels"
            dec = f"model.decoder (upsample at {ups})" if cfg.decoder else "model.channels"
            unit, things = nd.size_words(dims)[1], {1: "signals", 2: "images", 3: "volumes"}[dims]
            raise ConfigError(
                f"{dec} has {n_up} upsample blocks but {enc} has {n_down} downsample blocks, so the decoder "
                f"would output {out_size} {unit} for {image_size} {unit} {things}; give both sides the same count")
        self.final_layer = conv(c_dec, cfg.in_channels, 3, padding=1)

    def encode_raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_posterior(self.heads(self.encoder(x)))

    def decode_raw(self, z: Tensor) -> Tensor:
        return self.final_layer(self.decoder(self.decoder_input(z)))
