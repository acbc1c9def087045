"""What every architecture shares: the typed output, the VAE interface, and the small helpers.

An architecture subclasses `VAE` and implements two methods:

    encode_raw(x) -> (mu, logvar)   # the encoder's heads, before clamping
    decode_raw(z) -> Tensor         # the decoder, before the output activation

and `VAE` supplies everything else: the logvar clamp, the reparameterization with
`samples_per_input` Monte-Carlo samples, the output activation, prior sampling and counting.

Conventions (pinned in tests/test_models.py):
- logvar is clamped to [cfg.logvar_min, cfg.logvar_max] nats (defaults -30, 20) with a hard clamp,
  so exp(logvar) stays finite in bf16/fp16; the clamp passes no gradient outside that range.
- Under autocast, mu and logvar are returned in float32 (the heads are tiny; exp(logvar) of a fp16
  logvar above 11 nats would overflow), so the loss can use them without casting.
- L = samples_per_input samples are sample-major: z[l*B + i] is sample l of input i, and
  recon[l*B + i] its decoding; mu and logvar stay [B, *latent_shape].
- forward() always samples z (also in eval mode); to reconstruct from the posterior mean, call
  decode(mu). BatchNorm models follow the module's train/eval mode as usual, so call model.eval()
  before sample() or decode() for media: in train mode BatchNorm uses and updates batch statistics.
- Quantized models (model.quantizer.kind vq/ema/fsq, pipeline/models/quantize.py): the head gives one
  tensor, z_e, returned as mu with logvar None; forward() quantizes it (no sampling) and decodes the
  codes; decode(z) quantizes z first, so decoding an interpolation of z_e decodes its nearest codes;
  decode_indices() decodes integer codes; sample() decodes uniformly random codes. `quantize` blocks
  inside a block list add their losses and indices to the output. Only forward() in train mode (with
  grad) counts codes for the codebook updates (Quantizer.after_step).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipeline.config import ConfigError, ModelConfig
from pipeline.models.quantize import QuantizeBlock, Quantizer, QuantizerOutput
from pipeline.models.dims import SPATIAL_DIMS, size_words

OUTPUT_RANGES: dict[str, tuple[float, float]] = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0), "linear": (-1.0, 1.0)}
"""The data range each output activation implies (linear: no activation, trained towards [-1, 1] like LDM's)."""


@dataclass
class VAEOutput:
    recon: Tensor
    """[L*B, C, H, W] in the model's output_range, sample-major (recon[l*B+i] = sample l of input i)."""
    mu: Tensor
    """[B, *latent_shape] posterior mean (quantized models: z_e, the encoder's output before quantization)."""
    logvar: Tensor | None
    """[B, *latent_shape] posterior log-variance in nats, clamped to [logvar_min, logvar_max]; None when quantized."""
    z: Tensor
    """[L*B, *latent_shape] the samples that were decoded, sample-major like recon (quantized: the codes)."""
    indices: Tensor | None = None
    """Quantized bottleneck: [B, *code grid] int64 code indices."""
    quant_loss: Tensor | None = None
    """The summed weighted loss of every quantizer (bottleneck and blocks), float32 with grad; None if none."""
    quant_terms: dict[str, Tensor] = field(default_factory=dict)
    """Raw quantizer terms summed over quantizers (commitment, codebook), detached."""
    block_indices: dict[str, Tensor] = field(default_factory=dict)
    """Code indices of each `quantize` block, by its name."""


class VAE(nn.Module):
    """A diagonal-Gaussian VAE with a standard-normal prior. Subclasses build the networks."""

    def __init__(self, cfg: ModelConfig, image_size: int, latent_shape: tuple[int, ...]):
        super().__init__()
        if cfg.output not in OUTPUT_RANGES:
            raise ConfigError(f"model.output is {cfg.output!r} but must be one of {', '.join(OUTPUT_RANGES)}")
        self.arch = cfg.arch
        self.image_size = image_size
        self.spatial_dims = cfg.spatial_dims  # 1: [B, C, L], 2: [B, C, H, W], 3: [B, C, D, H, W]; image_size per axis
        self.in_channels = cfg.in_channels
        self.latent_shape: tuple[int, ...] = tuple(int(s) for s in latent_shape)
        self.output = cfg.output
        self.output_range: tuple[float, float] = OUTPUT_RANGES[cfg.output]
        self.samples_per_input = cfg.samples_per_input
        self.logvar_min = float(cfg.logvar_min)
        self.logvar_max = float(cfg.logvar_max)
        self.frozen: tuple[str, ...] = ()  # top-level parts that do not train (freeze())
        q = cfg.quantizer
        self.quantizer: Quantizer | None = None
        if q.kind != "none" and q.latent:
            vector = len(self.latent_shape) == 1
            if vector and self.latent_shape[0] % q.token_dim:
                raise ConfigError(f"model.latent_dim {self.latent_shape[0]} is not a multiple of "
                                  f"model.quantizer.token_dim {q.token_dim}; the vector latent is cut into tokens of "
                                  f"that many values")
            self.quantizer = Quantizer(q, q.token_dim if vector else self.latent_shape[0],
                                       "vector" if vector else "channels", "latent")

    @property
    def values_per_sample(self) -> int:
        """C*H*W (C*L, C*D*H*W): the sub-pixels (values) of one sample, what bits/dim divides by."""
        return self.in_channels * self.image_size ** self.spatial_dims

    def posterior_width(self, n: int) -> int:
        """Output width of the encoder's head for an n-value latent: mu and logvar, or z_e alone when quantized."""
        return n if self.quantizer is not None else 2 * n

    def split_posterior(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """The head's output -> (mu, logvar), or (z_e, None) when quantized."""
        return (h, None) if self.quantizer is not None else h.chunk(2, dim=1)

    @property
    def code_grid(self) -> tuple[int, ...]:
        """The bottleneck's token grid per image: (H/f, W/f) for a spatial latent, (latent_dim / token_dim,) for a vector."""
        if self.quantizer is None:
            raise ValueError("the model has no quantized latent")
        if self.quantizer.layout == "vector":
            return (self.latent_shape[0] // self.quantizer.token_dim,)
        return self.latent_shape[1:]

    # -- to implement ---------------------------------------------------------------------------

    def encode_raw(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images [B, C, H, W] -> (mu, logvar), each [B, *latent_shape], logvar not yet clamped; use
        split_posterior on a head of posterior_width(...) channels (quantized: (z_e, None))."""
        raise NotImplementedError

    def decode_raw(self, z: Tensor) -> Tensor:
        """Latents [N, *latent_shape] -> [N, C, H, W] before the output activation."""
        raise NotImplementedError

    # -- the interface --------------------------------------------------------------------------

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images in output_range [B, C, H, W] -> (mu, logvar clamped), each [B, *latent_shape]
        (quantized: (z_e, None), z_e before quantization)."""
        self._reset_blocks()
        return self._encode(x)

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        mu, logvar = self.encode_raw(x)
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        if logvar is None:
            return (mu.float() if autocast else mu), None
        if autocast:
            mu, logvar = mu.float(), logvar.float()
        return mu, logvar.clamp(self.logvar_min, self.logvar_max)

    def reparameterize(self, mu: Tensor, logvar: Tensor, n_samples: int = 1,
                       generator: torch.Generator | None = None) -> Tensor:
        """z = mu + exp(logvar/2) * eps, eps ~ N(0, I): [n_samples*B, *latent_shape], sample-major."""
        std = torch.exp(0.5 * logvar)
        # torch.randn with an explicit shape (not randn_like) so the noise does not depend on the
        # memory format of mu (channels_last would otherwise reorder the same random stream).
        eps = torch.randn((n_samples, *mu.shape), dtype=mu.dtype, device=mu.device, generator=generator)
        z = mu.unsqueeze(0) + eps * std.unsqueeze(0)
        return z.reshape(n_samples * mu.shape[0], *mu.shape[1:])

    def decode(self, z: Tensor) -> Tensor:
        """Latents [N, *latent_shape] -> images [N, C, H, W] in output_range (quantized: z's nearest codes)."""
        self._reset_blocks()
        if self.quantizer is not None:
            z = self.quantizer(z).z_q
        return self._decode(z)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Code indices [N, *code_grid] of a quantized model -> images [N, C, H, W] in output_range."""
        if self.quantizer is None:
            raise ValueError("decode_indices needs a quantized model (model.quantizer.kind vq, ema or fsq)")
        self._reset_blocks()
        return self._decode(self.quantizer.decode_indices(indices))

    def _decode(self, z: Tensor) -> Tensor:
        out = self.decode_raw(z)
        if self.output == "linear":
            return out
        return torch.tanh(out) if self.output == "tanh" else torch.sigmoid(out)

    def forward(self, x: Tensor, n_samples: int | None = None) -> VAEOutput:
        """Encode, draw L = n_samples (default samples_per_input) samples of z per input, decode all
        (quantized: quantize z_e instead of sampling, and collect every quantizer's loss and indices)."""
        self._reset_blocks()
        mu, logvar = self._encode(x)
        outputs: list[QuantizerOutput] = []
        indices = None
        if self.quantizer is not None:
            q = self.quantizer(mu, track=self.training and torch.is_grad_enabled())
            z, indices = q.z_q, q.indices
            outputs.append(q)
        else:
            z = self.reparameterize(mu, logvar, n_samples or self.samples_per_input)
        recon = self._decode(z)
        blocks = {name: b.pending.pop() for name, b in self._quantize_blocks().items() if b.pending}
        outputs += blocks.values()
        out = VAEOutput(recon=recon, mu=mu, logvar=logvar, z=z, indices=indices,
                        block_indices={name: o.indices for name, o in blocks.items()})
        if outputs:
            out.quant_loss = sum(o.loss for o in outputs)
            for o in outputs:
                for name, value in o.terms.items():
                    out.quant_terms[name] = out.quant_terms[name] + value if name in out.quant_terms else value
        return out

    def _quantize_blocks(self) -> dict[str, QuantizeBlock]:
        if not hasattr(self, "_blocks"):
            self._blocks = {m.quantizer.name: m for m in self.modules() if isinstance(m, QuantizeBlock)}
        return self._blocks

    def _reset_blocks(self) -> None:
        for block in self._quantize_blocks().values():
            block.pending.clear()

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """n images decoded from z ~ N(0, temperature^2 I) (no gradients; see the module docstring on eval());
        quantized models: from uniformly random codes (temperature unused)."""
        param = next(self.parameters())
        device = generator.device if generator is not None else param.device
        if self.quantizer is not None:
            codes = torch.randint(self.quantizer.num_codes, (n, *self.code_grid), generator=generator, device=device)
            return self.decode_indices(codes.to(param.device))
        z = torch.randn((n, *self.latent_shape), generator=generator, device=device) * temperature
        return self.decode(z.to(param.device, param.dtype))

    def freeze(self, parts: Sequence[str]) -> None:
        """Keep these top-level parts (train.freeze) as they are: no gradients, so neither the optimizer nor
        DDP's gradient reduction sees them (call before accelerator.prepare: DDP registers only parameters that
        require grad), and eval mode, which train() keeps, so their BatchNorm statistics do not move either."""
        names = [name for name, _ in self.named_children()]
        for part in parts:
            if part not in names:
                close = difflib.get_close_matches(part, names, n=1)
                raise ConfigError(f"train.freeze names {part!r}, which is not a part of the {self.arch} model"
                                  f"{f' (did you mean {close[0]}?)' if close else ''}; its parts are "
                                  f"{', '.join(names)}")
        if set(names) <= set(parts):
            raise ConfigError(f"train.freeze holds every part of the {self.arch} model ({', '.join(names)}), so "
                              f"nothing would train; leave out the parts to finetune, e.g. decoder")
        self.frozen = tuple(parts)
        for part in parts:
            getattr(self, part).requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "VAE":
        super().train(mode)
        for part in self.frozen:  # frozen parts stay in eval mode whatever the training loop switches
            getattr(self, part).eval()
        return self

    def num_parameters(self) -> int:
        """All parameters (trainable or not)."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (f"arch={self.arch}, image_size={self.image_size}, latent_shape={self.latent_shape}, "
                f"output={self.output}, samples_per_input={self.samples_per_input}")


class FlatLatentVAE(VAE):
    """A conv encoder flattened into Linear mu/logvar heads, and a Linear back to the last feature map
    (the flowers conv VAE, AntixK's VanillaVAE). Subclasses build `encoder` (ending in Flatten), `heads`, `decoder_input` and the
    decoder; `feature_shape` and `flat` are the last feature map's shape and size."""

    def __init__(self, cfg: ModelConfig, image_size: int):
        check_common(cfg, image_size, ("vector",))
        levels = len(cfg.channels)
        side = check_levels("model.channels", levels, image_size, f"model.channels has {levels} levels",
                            cfg.spatial_dims)
        super().__init__(cfg, image_size, (cfg.latent_dim,))
        self.feature_shape = (cfg.channels[-1], *[side] * cfg.spatial_dims)
        self.flat = cfg.channels[-1] * side ** cfg.spatial_dims

    def encode_raw(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.split_posterior(self.heads(self.encoder(x)))

    def features(self, z: Tensor) -> Tensor:
        """z [B, latent_dim] -> the decoder's input feature map [B, *feature_shape]."""
        return self.decoder_input(z).view(z.shape[0], *self.feature_shape)


# ----------------------------------------------------------------------------------------------
# Helpers shared by the architectures.
# ----------------------------------------------------------------------------------------------


def check_levels(key: str, n_downsamples: int, image_size: int, what: str, dims: int = 2) -> int:
    """Raise unless image_size halves cleanly n_downsamples times; return the final side in px.

    `what` describes the config, e.g. "model.channels has 6 levels". dims (model.spatial_dims) only
    changes the wording: a signal length in samples, a volume side in voxels.
    """
    factor = 2 ** n_downsamples
    if image_size < factor or image_size % factor:
        noun, unit = size_words(dims)
        article = "an" if noun[0] in "aeiou" else "a"
        raise ConfigError(
            f"{what}, which needs the {noun} to be divisible by {factor}, but the shards are "
            f"{image_size} {unit}; use {article} {noun} that is a multiple of {factor} or fewer entries in {key}")
    return image_size // factor


def check_common(cfg: ModelConfig, image_size: int, latents: tuple[str, ...]) -> None:
    """The checks every architecture needs before building anything."""
    if cfg.latent not in latents:
        raise ConfigError(
            f"model.arch {cfg.arch} supports model.latent {' or '.join(latents)}, not {cfg.latent}; "
            f"set model.latent={latents[0]}")
    if cfg.spatial_dims not in SPATIAL_DIMS:
        raise ConfigError(f"model.spatial_dims must be 1, 2 or 3, got {cfg.spatial_dims}")
    if image_size < 1:
        raise ConfigError(f"the image size must be positive, got {image_size}")
    for key in ("in_channels", "latent_dim", "latent_channels", "samples_per_input"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.arch != "resnet" or not (cfg.encoder and cfg.decoder):
        if not cfg.channels:
            raise ConfigError(f"model.channels must list at least one level width for model.arch {cfg.arch}")
        for i, c in enumerate(cfg.channels):
            if c < 1:
                raise ConfigError(f"model.channels[{i}] must be at least 1, got {c}")


def group_count(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups: 32 when it divides the channels (LDM), else the largest common divisor."""
    return math.gcd(max_groups, channels)
