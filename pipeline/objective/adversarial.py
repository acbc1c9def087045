"""The adversarial stage's pieces: a PatchGAN discriminator, the hinge / non-saturating losses, LeCam and
R1 regularisation, the adaptive generator weight, and the schedule (disc_start, disc_warmup_steps).

    disc = NLayerDiscriminator(in_channels=3, channels=64, layers=3)     # logits [N, 1, h, w], one per patch
    schedule = AdversarialSchedule(cfg.loss.adversarial, cfg.train.max_steps)
    w = adaptive_weight(rec_loss, gan_loss, decoder_last_layer(vae), max_weight=1e4)

How they are trained (two optimizers, two visible steps) is pipeline/step.py's business; nothing here
knows about DDP or Accelerate. Every loss is computed in float32 with autocast disabled, like VAELoss.

Schedule, with step = optimizer steps already taken (0 at the first step, as for the beta schedule):
    the discriminator trains on steps >= disc_start;
    the generator's adversarial term is on for steps >= disc_start + disc_warmup_steps.
disc_start below 1 is a fraction of train.max_steps (rounded down), from 1 up a step number.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import AdversarialConfig, ConfigError, OptimConfig

ADAPTIVE_EPS = 1e-4
"""Added to ||grad L_gan|| in the adaptive weight (taming's 1e-4), in float32."""


# --------------------------------------------------------------------------------------------
# The discriminator
# --------------------------------------------------------------------------------------------


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class NLayerDiscriminator(nn.Module):
    """The PatchGAN of pix2pix / taming-transformers: `layers` stride-2 4x4 convolutions (widths
    channels, 2x, 4x, ... at most 8x), one stride-1 4x4 convolution, and a 1-channel 4x4 convolution
    giving a logit per overlapping patch. Its receptive field is 70 px for layers=3.

    GroupNorm instead of taming's BatchNorm: no running statistics, so a skipped (non-finite) step leaves
    nothing behind, DDP has no buffers to broadcast, and real and fake batches need not share a forward."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(_groups(out), out), nn.LeakyReLU(0.2)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        self.layers = layers
        for m in self.modules():  # taming's weights_init: N(0, 0.02) convolutions, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def build_discriminator(cfg: AdversarialConfig, in_channels: int, image_size: int) -> NLayerDiscriminator:
    """The recipe's discriminator; ConfigError when its logit map would be empty at this image size."""
    if not _fits(image_size, cfg.disc_layers):
        raise ConfigError(f"loss.adversarial.disc_layers={cfg.disc_layers} is too deep for {image_size} px images "
                          f"(the logit map would be empty); use at most {max_layers(image_size)} layers")
    disc = NLayerDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers)
    return disc


def _fits(image_size: int, layers: int) -> bool:
    """Is the logit map at least 1x1? layers 4x4 stride-2 convolutions (padding 1) halve the side, then
    two stride-1 ones take 1 each."""
    size = image_size
    for _ in range(layers):
        size = (size + 2 - 4) // 2 + 1
        if size < 1:
            return False
    return size - 2 >= 1  # two k4 s1 p1 convolutions take 1 each


def max_layers(image_size: int) -> int:
    n = 1
    while _fits(image_size, n + 1):
        n += 1
    return n


def decoder_last_layer(vae: nn.Module) -> nn.Parameter:
    """The weight of the decoder's last layer, where the adaptive weight compares gradients: every model
    in pipeline.models registers its decoder (and its output layer) after the encoder, so this is the last
    parameter with more than one dimension (resnet: final_layer.weight, conv/dcgan: the last decoder conv)."""
    return [p for p in vae.parameters() if p.dim() > 1][-1]


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def discriminator_loss(kind: str, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """hinge: 0.5 (E relu(1 - D(x)) + E relu(1 + D(G))); non_saturating: 0.5 (E softplus(-D(x)) +
    E softplus(D(G))). Mean over every patch logit; float32."""
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def generator_loss(kind: str, logits_fake: Tensor) -> Tensor:
    """hinge: -E D(G) (taming); non_saturating: E softplus(-D(G)) = -E log sigmoid(D(G)). float32."""
    fake = logits_fake.float()
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def lecam_penalty(logits_real: Tensor, logits_fake: Tensor, ema_real: Tensor, ema_fake: Tensor) -> Tensor:
    """LeCam regularisation (Tseng et al. 2021, as in bytedance/1d-tokenizer):
    E relu(D(x) - ema_fake)^2 + E relu(ema_real - D(G))^2, with the EMAs of the mean logits."""
    return (F.relu(logits_real.float() - ema_fake).square().mean()
            + F.relu(ema_real - logits_fake.float()).square().mean())


def r1_penalty(logits_real: Tensor, real: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): E ||grad_x D(x)||^2 per image, with a graph (create_graph) so it
    trains the discriminator. `real` must require grad and be what logits_real was computed from."""
    (grad,) = torch.autograd.grad(logits_real.float().sum(), real, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float,
                    eps: float = ADAPTIVE_EPS, loss_scale: Tensor | float | None = None) -> Tensor:
    """||dL_rec/dW|| / (||dL_gan/dW|| + eps) at the decoder's last layer W, clamped to [0, max_weight] and
    detached (Esser et al. 2021).

    bf16/fp16 cannot make it NaN or inf: the norms are taken in float32 (of the float32 master weight's
    gradients), any non-finite norm or ratio gives 0 (the adversarial term then sits out this step instead
    of poisoning it), and the clamp bounds the rest. Under fp16 pass the GradScaler's scale as loss_scale:
    both gradients are taken of the scaled losses, so small ones do not flush to zero in half precision
    (taming's NaNs), and eps is scaled alike, so the ratio is the unscaled one."""
    scale = 1.0 if loss_scale is None else loss_scale
    rec_grad, = torch.autograd.grad(rec_loss * scale, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss * scale, last_layer, retain_graph=True)
    rec_norm = torch.linalg.vector_norm(rec_grad.float())
    gan_norm = torch.linalg.vector_norm(gan_grad.float())
    w = rec_norm / (gan_norm + eps * torch.as_tensor(scale, dtype=torch.float32, device=rec_norm.device))
    w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    return w.clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------------------------
# Schedule and running state
# --------------------------------------------------------------------------------------------


class AdversarialSchedule:
    """disc_start resolved against max_steps; when each side of the game is on (pure functions of the
    step, so nothing to checkpoint and every rank decides alike); the discriminator's lr schedule."""

    def __init__(self, cfg: AdversarialConfig, max_steps: int):
        self.cfg = cfg
        self.max_steps = max_steps
        self.disc_start = int(cfg.disc_start * max_steps) if cfg.disc_start < 1 else int(cfg.disc_start)
        self.gen_start = self.disc_start + cfg.disc_warmup_steps

    def disc_active(self, step: int) -> bool:
        return self.cfg.weight > 0 and step >= self.disc_start

    def gen_active(self, step: int) -> bool:
        return self.cfg.weight > 0 and step >= self.gen_start

    def optim_config(self) -> OptimConfig:
        """The discriminator's optimizer settings in the shape pipeline.optim expects."""
        c = self.cfg
        return OptimConfig(name="adamw", lr=c.lr, weight_decay=c.weight_decay, betas=list(c.betas),
                           schedule=c.schedule, warmup_steps=c.warmup_steps, grad_clip_norm=c.grad_clip_norm,
                           ema_decay=0.0)

    def lr_step(self, step: int) -> int:
        """The discriminator's own step count at training step `step` (its schedule starts at disc_start)."""
        return max(0, step - self.disc_start)

    def lr_steps(self) -> int:
        return max(1, self.max_steps - self.disc_start)


class LeCamEMA(nn.Module):
    """The EMAs of the mean real and fake logits that LeCam anchors to. Updated from the all-reduced means
    (the same on every rank) and only on applied steps, so they resume exactly; checkpointed as buffers."""

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("real", torch.zeros(()))
        self.register_buffer("fake", torch.zeros(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, mean_real: Tensor, mean_fake: Tensor, ok: Tensor) -> None:
        # The first update takes the values as they are (an EMA started at 0 would pull toward 0).
        decay = (self.count > 0).float() * self.decay  # (no tensor from a Python float: no host-to-device copy)
        new_real = decay * self.real + (1 - decay) * mean_real.float()
        new_fake = decay * self.fake + (1 - decay) * mean_fake.float()
        self.real.copy_(torch.where(ok, new_real, self.real))
        self.fake.copy_(torch.where(ok, new_fake, self.fake))
        self.count.add_(ok.long())
