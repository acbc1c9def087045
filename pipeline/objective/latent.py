"""Regularisers that make a VAE's latent easier for a diffusion model to learn (README: Latents for diffusion).

    reg = LatentRegularisers(cfg.loss, output_range, image_channels, latent_shape, spatial_dims)  # ConfigError
    total, terms = reg(vae, out, images, step, image_total, recon_loss)    # VAELoss adds both

Three terms, each off while its weight is 0; z is the decoded sample (the first one when samples_per_input > 1),
x the input images, D the decoder, e(.,.) the run's element-wise reconstruction loss averaged (loss.recon):

- vf (alignment with a frozen foundation model): p = W z, a learned 1x1 projection (no bias) of z to the
  backbone's feature width; F the backbone's features of x (resized to vf.input_size px). Both maps are brought
  to the coarser of the two grids by area averaging, then, per image, with cosines over channels:
      vf_distmat = mean_{i,j} relu(|cos(p_i, p_j) - cos(F_i, F_j)| - distmat_margin)
      vf_cos     = mean_i relu(1 - cos_margin - cos(p_i, F_i))
      vf         = distmat_weight * vf_distmat + cos_weight * vf_cos
  and the term is weight * a * vf with the adaptive weight a = ||grad L_img|| / (||grad vf|| + 1e-4) at the
  encoder's last layer (its latent head), clamped to [0, adaptive_weight_max] and detached; L_img is the sum of
  the image terms that entered the total (recon, perceptual, SSIM, TV), not the KL: that is the reconstruction
  loss the alignment is balanced against. Non-finite ratios give a = 0 for that step. Under fp16 the two
  gradients are taken of the unscaled losses (the adversarial weight uses the GradScaler's scale; here a flush to
  zero of both gives a = 0, the alignment sitting out a step, never a non-finite loss). The projection is a
  parameter of the loss: trained with the model, checkpointed with the loss's state ("loss.vf.proj.weight").
- equivariance: with `probability` per micro-batch, one transform T drawn uniformly from every combination of a
  downscale s in {1} + scales and a rotation r in {0} + rotations_degrees except the identity:
      equivariance = e(D(T z), T x)
  T scales the latent to round(s h) x round(s w) positions and the images to f times that (f the model's
  downsampling factor), bilinear with antialiasing, then rotates both by r (torch.rot90: exact). On the draws
  that skip it the term is 0 and costs nothing; `equivariance_drawn` logs the fraction of micro-batches drawn.
- latent_noise: sigma_b ~ U[sigma_min, sigma_max] * min(1, step / warmup_steps) per sample, eps ~ N(0, I):
      latent_noise = e(D(z + sigma * eps), x)
  A second decode with its own weight, beside the clean one: recent tokenizers (RAE's noise-augmented decoder,
  l-DeTok's latent denoising) instead replace the decoder's input by the noisy latent during training; keeping
  the clean reconstruction as its own term lets the weight set the trade-off and leaves every other term (and the
  media) about the clean decode, at the cost of one more decoder pass. `latent_noise_sigma` logs the mean sigma.

Random draws come from torch's default generators, whose states every checkpoint holds (rng_rank<r>.safetensors):
the equivariance coin and transform from the CPU generator (no device sync), the noise from the latent's device's
generator, so a resumed run draws the same values as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ConfigError, LossConfig, PerceptualConfig
from pipeline.objective.image import to_unit_range
from pipeline.objective.perceptual import PerceptualDistance

ADAPTIVE_EPS = 1e-4
"""Added to ||grad vf|| in the adaptive weight, as for the adversarial one."""


def encoder_last_layer(vae: nn.Module) -> nn.Parameter:
    """The weight of the encoder's last layer, the head that outputs the latent (mu and logvar): every model in
    pipeline.models calls it `heads`."""
    return [p for p in vae.heads.parameters() if p.dim() > 1][-1]


def vf_losses(proj: Tensor, feats: Tensor, distmat_margin: float, cos_margin: float) -> tuple[Tensor, Tensor]:
    """(vf_distmat, vf_cos) for a projected latent [B, D, h, w] and features [B, D, H, W] (see the module doc)."""
    h, w = min(proj.shape[-2], feats.shape[-2]), min(proj.shape[-1], feats.shape[-1])
    if proj.shape[-2:] != (h, w):
        proj = F.adaptive_avg_pool2d(proj, (h, w))
    if feats.shape[-2:] != (h, w):
        feats = F.adaptive_avg_pool2d(feats, (h, w))
    p = F.normalize(proj.flatten(2), dim=1)  # [B, D, N]: unit vectors per position
    f = F.normalize(feats.flatten(2), dim=1)
    sim_p = torch.einsum("bci,bcj->bij", p, p)
    sim_f = torch.einsum("bci,bcj->bij", f, f)
    distmat = F.relu((sim_p - sim_f).abs() - distmat_margin).mean()
    cos = F.relu(1 - cos_margin - (p * f).sum(1)).mean()
    return distmat, cos


def transforms(scales, rotations_degrees) -> list[tuple[float, int]]:
    """Every (scale, quarter turns) the equivariance term draws from: the combinations minus the identity."""
    out = []
    for s in dict.fromkeys([1.0, *(float(s) for s in scales)]):
        for k in dict.fromkeys([0, *((int(r) // 90) % 4 for r in rotations_degrees)]):
            if (s, k) != (1.0, 0):
                out.append((s, k))
    return out


def apply_transform(x: Tensor, size: tuple[int, int], quarter_turns: int) -> Tensor:
    """x [N, C, H, W] resized to `size` (bilinear, antialiased; unchanged when equal) then rotated by quarter_turns
    x 90 degrees counter-clockwise."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return torch.rot90(x, quarter_turns, dims=(-2, -1)) if quarter_turns else x


def noise_sigmas(n: int, sigma_min: float, sigma_max: float, warmup_steps: int, step: int,
                 device: torch.device) -> Tensor:
    """[n] float32: sigma per sample, U[sigma_min, sigma_max] scaled by the warm-up ramp min(1, step/warmup_steps)."""
    ramp = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    u = torch.rand((n,), device=device)
    return (sigma_min + (sigma_max - sigma_min) * u) * ramp


class LatentRegularisers(nn.Module):
    """The vf, equivariance and latent_noise terms (module doc), for VAELoss. Parameters: the vf projection only;
    the backbone is frozen and kept out of parameters() and state_dict() as the perceptual loss's is."""

    def __init__(self, cfg: LossConfig, output_range: tuple[float, float], image_channels: int,
                 latent_shape: tuple[int, ...], spatial_dims: int = 2):
        super().__init__()
        self.cfg = cfg
        self.output_range = (float(output_range[0]), float(output_range[1]))
        spatial = len(latent_shape) == 1 + spatial_dims and len(latent_shape) > 1
        for key, need_2d in (("vf", True), ("equivariance", True), ("latent_noise", False)):
            weight = getattr(cfg, key).weight
            if weight > 0 and need_2d and not (spatial and spatial_dims == 2):
                raise ConfigError(f"loss.{key}.weight is {weight}, but it needs a spatial latent of 2-D images "
                                  f"(C x H/f x W/f) and this model's latent is {list(latent_shape)}; use model.arch "
                                  f"resnet or dcgan with model.latent=spatial, or set loss.{key}.weight=0")
        self.vf = None
        if cfg.vf.weight > 0:
            self.vf = nn.Module()
            v = cfg.vf
            pc = PerceptualConfig(weight=1.0, backbone=v.backbone, weights=v.weights, layers=list(v.layers))
            # The frozen backbone (not registered: no parameters, no state), its features normalised per position.
            self.vf.features = PerceptualDistance(pc, self.output_range, image_channels, key="loss.vf",
                                                  what="latent alignment", extra={"dynamic_img_size": True})
            width = self.vf.features.backbone.feature_info.channels()[-1]
            self.vf.proj = nn.Conv2d(latent_shape[0], width, 1, bias=False)
        self.transforms = transforms(cfg.equivariance.scales, cfg.equivariance.rotations_degrees)

    @property
    def active(self) -> bool:
        c = self.cfg
        return c.vf.weight > 0 or c.equivariance.weight > 0 or c.latent_noise.weight > 0

    def forward(self, vae: nn.Module, out, images: Tensor, step: int, image_total: Tensor,
                recon_loss) -> tuple[Tensor, dict[str, Tensor]]:
        """(the weighted sum to add to the total, {name: value with grad}). out: the VAEOutput; images: the target
        in the output range; image_total: the image terms' weighted sum (the vf adaptive weight's reference);
        recon_loss(recon, target) -> the mean element-wise reconstruction loss (float32)."""
        cfg = self.cfg
        device = images.device
        b = images.shape[0]
        z = out.z[:b]
        total = torch.zeros((), device=device)
        terms: dict[str, Tensor] = {}
        if self.vf is not None:
            vf, distmat, cos = self.vf_term(z, images)
            w = self.vf_adaptive_weight(vae, image_total, vf) if cfg.vf.adaptive_weight else torch.ones((), device=device)
            weighted = cfg.vf.weight * w * vf
            total = total + weighted
            terms.update(vf=vf, vf_distmat=distmat, vf_cos=cos, vf_adaptive_weight=w, vf_weighted=weighted)
        if cfg.equivariance.weight > 0:
            eq, drawn = self.equivariance_term(vae, z, images, recon_loss)
            total = total + cfg.equivariance.weight * eq
            terms.update(equivariance=eq, equivariance_drawn=torch.full((), float(drawn), device=device))
        if cfg.latent_noise.weight > 0:
            n = cfg.latent_noise
            sigma = noise_sigmas(b, n.sigma_min, n.sigma_max, n.warmup_steps, step, device)
            eps = torch.randn(z.shape, device=device, dtype=z.dtype)  # explicit shape: independent of memory format
            noisy = z + sigma.to(z.dtype).view(-1, *[1] * (z.dim() - 1)) * eps
            noise = recon_loss(vae._decode(noisy), images)
            total = total + n.weight * noise
            terms.update(latent_noise=noise, latent_noise_sigma=sigma.mean())
        return total, terms

    def vf_term(self, z: Tensor, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(vf, vf_distmat, vf_cos) for latents z [B, C, h, w] and images [B, C, H, W] in the output range."""
        v = self.cfg.vf
        x01 = to_unit_range(images, self.output_range)
        size = (v.input_size, v.input_size)
        with torch.no_grad():  # the backbone runs under the caller's autocast; no gradient reaches it or the images
            x01 = F.interpolate(x01.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
            feats = self.vf.features.features(x01)[-1]
        with torch.autocast(images.device.type, enabled=False):
            proj = self.vf.proj(z.float())
            distmat, cos = vf_losses(proj, feats.float(), v.distmat_margin, v.cos_margin)
            return v.distmat_weight * distmat + v.cos_weight * cos, distmat, cos

    def vf_adaptive_weight(self, vae: nn.Module, image_total: Tensor, vf: Tensor) -> Tensor:
        layer = encoder_last_layer(vae)
        with torch.autocast(vf.device.type, enabled=False):
            rec_grad, = torch.autograd.grad(image_total, layer, retain_graph=True)
            vf_grad, = torch.autograd.grad(vf, layer, retain_graph=True)
            w = torch.linalg.vector_norm(rec_grad.float()) / (torch.linalg.vector_norm(vf_grad.float()) + ADAPTIVE_EPS)
            w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
            return w.clamp(0.0, self.cfg.vf.adaptive_weight_max).detach()

    def draw_transform(self) -> tuple[float, int] | None:
        """(scale, quarter turns) for this micro-batch, or None (probability 1 - p), from the CPU generator."""
        if torch.rand(()).item() >= self.cfg.equivariance.probability:  # a CPU tensor: no device sync
            return None
        return self.transforms[int(torch.randint(len(self.transforms), ()).item())]

    def equivariance_term(self, vae: nn.Module, z: Tensor, images: Tensor, recon_loss) -> tuple[Tensor, bool]:
        drawn = self.draw_transform()
        if drawn is None:
            return torch.zeros((), device=images.device), False
        scale, turns = drawn
        h, w = z.shape[-2:]
        zh, zw = max(1, round(h * scale)), max(1, round(w * scale))
        factor = images.shape[-2] // h
        z_t = apply_transform(z, (zh, zw), turns)
        x_t = apply_transform(images, (zh * factor, zw * factor), turns)
        return recon_loss(vae._decode(z_t), x_t), True

    def active_terms(self) -> list[str]:
        c = self.cfg
        terms = []
        if c.vf.weight > 0:
            terms.append(f"{c.vf.weight:g} x {'adaptive x ' if c.vf.adaptive_weight else ''}VF alignment "
                         f"({c.vf.backbone}, weights {c.vf.weights})")
        if c.equivariance.weight > 0:
            e = c.equivariance
            terms.append(f"{e.weight:g} x equivariance (p {e.probability:g}, scales {e.scales}, rotations "
                         f"{e.rotations_degrees})")
        if c.latent_noise.weight > 0:
            n = c.latent_noise
            terms.append(f"{n.weight:g} x latent noise (sigma U[{n.sigma_min:g}, {n.sigma_max:g}]"
                         + (f", warm-up {n.warmup_steps} steps" if n.warmup_steps else "") + ")")
        return terms


__all__ = ["LatentRegularisers", "apply_transform", "encoder_last_layer", "noise_sigmas", "transforms", "vf_losses"]
