"""VAELoss: reconstruction + beta-weighted KL + optional perceptual / SSIM / TV / sparsity terms, and the
per-model likelihood methods evaluation needs (log p(x|z), negative ELBO, IWAE log weights).

    loss_fn = VAELoss(cfg.loss, model.output_range, image_channels=3)    # ConfigError on a bad combination
    result = loss_fn(model(x), x, step)           # LossResult(total, terms, kl_per_dim)
    result.total.backward()

Reductions (the units every weight in a recipe multiplies):

    total = recon_weight      * recon         per-sub-pixel mean of the reconstruction loss, also averaged
                                              over the samples_per_input samples of z (see below)
          + kl_weighted                       beta(step) * sum_d max(free_bits, mean_b KL_bd)   (nats / image)
            or quantizer                      quantized models: the quantizers' weighted commitment (+ codebook)
                                              loss (pipeline/models/quantize.py) instead of the KL
          + perceptual.weight * perceptual    channel-normalised feature distance of a frozen timm backbone
          + ssim_loss                         ssim_weight * (1 - SSIM), SSIM on images in [0, 1]
          + tv_weight         * tv            total variation per pixel (see `total_variation`)
          + sparsity_weight   * sparsity      mean |mu| over batch and latent dimensions
          + vf.weight * a     * vf            latent alignment with a frozen foundation model, a the adaptive weight
          + equivariance.weight * equivariance  reconstruction of a downscaled/rotated latent (drawn with probability p)
          + latent_noise.weight * latent_noise  reconstruction of z + sigma * eps
  The last three (pipeline/objective/latent.py) need the model: they are computed when forward() is given it (the
  training step does; validation does not).

- `recon` is the element-wise loss e(x_hat, x) averaged over every sub-pixel (C*H*W) of every image and
  every Monte-Carlo sample: l1 |x_hat - x|, mse (x_hat - x)^2, bce the binary cross-entropy (images in
  [0, 1]), gaussian the negative log-density 0.5*(log s^2 + (x_hat - x)^2 / s^2 + log 2pi) with a learned
  log-variance log s^2 (one scalar, or one per channel) that this module owns as an nn.Parameter, so it
  is optimized together with the model. Pixel differences (l1, mse, gaussian, tv) are taken in the
  model's output range (the flowers conv VAE's 5 x L1 was on [-1, 1] images); terms with absolute
  constants (SSIM, the perceptual backbone, bce) see images converted to [0, 1].
  The per-image SUM of the same element-wise loss (nats for gaussian and bce) is `recon_per_image`.
- The KL term is the closed-form KL(N(mu, diag sigma^2) || N(0, I)) summed over the latent dimensions
  and averaged over the batch, i.e. nats per image (AntixK/PyTorch-VAE's convention). `kl` in the
  terms is that raw value (no free bits, no beta); `kl_weighted` is what enters the total.
- With samples_per_input L > 1 the recon is [L*B, ...] sample-major; the target is broadcast over the
  L samples and every image term is averaged over them (the DCGAN dog VAE's `no_of_sample`).
- `step` = optimizer steps already taken (0 at the first step); it only drives the beta schedule.

forward() never calls .item() or anything else that waits for the device, with one exception: bce
checks once (and on every CPU call) that the values are inside [0, 1]. Every term is computed in
float32 with autocast disabled, so bf16/fp16 training changes only the networks' precision.

Likelihood conventions (evaluation, issue 6) are documented at `log_px_z`; the model-free helpers it
uses live in pipeline.objective.likelihood; bits/dim = nats / (C*H*W*ln 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.config import ConfigError, LossConfig
from pipeline.objective.image import ssim as ssim_map
from pipeline.objective.image import to_unit_range, total_variation
from pipeline.objective.kl import check_kl, kl_beta, kl_per_dim
from pipeline.objective.latent import LatentRegularisers
from pipeline.objective.likelihood import (GAUSSIAN_LOGVAR_RANGE, LOG_2PI, RECON_KINDS, bce_elementwise,
                                           bernoulli_log_prob, discretized_gaussian_log_prob,
                                           discretized_laplace_log_prob, log_importance_weights,
                                           unit_range_violation)
from pipeline.objective.perceptual import PerceptualDistance


@dataclass
class LossResult:
    total: Tensor
    """Scalar with grad: the weighted sum that is backpropagated."""
    terms: dict[str, Tensor]
    """Detached float32 scalars by name: recon always; kl, kl_weighted, beta for a Gaussian bottleneck;
    quantizer (the weighted sum that entered the total), quantizer_commitment, quantizer_codebook (vq) when
    the model quantizes; perceptual, ssim, ssim_loss, tv, sparsity when their weight is > 0; vf, vf_distmat, vf_cos,
    vf_adaptive_weight, vf_weighted; equivariance, equivariance_drawn; latent_noise, latent_noise_sigma when those
    are on and the model was given. Raw (unweighted) values except kl_weighted (= beta * free-bits KL),
    ssim_loss (= ssim_weight * (1 - ssim)) and vf_weighted, which are the amounts that entered the total."""
    kl_per_dim: Tensor
    """[D] detached: batch-mean KL per latent dimension in nats (no free bits, no beta); empty when quantized."""


class VAELoss(nn.Module):
    """recon + KL + perceptual + SSIM + TV + sparsity, configured by the recipe's `loss:` section.

    Parameters: the gaussian likelihood's learned log-variance (`gaussian_logvar`, shape [] or [C]) and the latent
    alignment's projection (`latent.vf.proj`), which the trainer optimizes with the model. The perceptual backbone is frozen and deliberately kept
    out of parameters() and state_dict() (see pipeline.objective.perceptual.PerceptualDistance)."""

    def __init__(self, cfg: LossConfig, output_range: tuple[float, float], image_channels: int,
                 spatial_dims: int = 2, latent_shape: tuple[int, ...] | None = None):
        """latent_shape: the model's (VAE.latent_shape), needed for the latent regularisers; None builds none of
        them (evaluation and inference, which never compute them)."""
        super().__init__()
        self.cfg = cfg
        self.spatial_dims = int(spatial_dims)  # 1: [B, C, L], 2: [B, C, H, W], 3: [B, C, D, H, W]
        self.output_range = (float(output_range[0]), float(output_range[1]))
        self.image_channels = int(image_channels)
        if cfg.recon not in RECON_KINDS:
            raise ConfigError(f"loss.recon is {cfg.recon!r} but must be one of {', '.join(RECON_KINDS)}")
        if cfg.recon == "bce" and self.output_range != (0.0, 1.0):
            raise ConfigError(
                f"loss.recon is bce, which needs outputs in [0, 1], but the model's output range is "
                f"{self.output_range}; set model.output=sigmoid or use loss.recon=l1/mse/gaussian")
        for key in ("recon_weight", "ssim_weight", "tv_weight", "sparsity_weight"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"loss.{key} must be 0 or more, got {getattr(cfg, key)}")
        if cfg.perceptual.weight < 0:
            raise ConfigError(f"loss.perceptual.weight must be 0 or more, got {cfg.perceptual.weight}")
        if cfg.perceptual.weight > 0 and self.spatial_dims != 2:
            raise ConfigError(f"loss.perceptual.weight is {cfg.perceptual.weight}, but it works on 2-D images only "
                              f"and model.spatial_dims is {self.spatial_dims}; set loss.perceptual.weight=0")
        if cfg.ssim_weight > 0 and (cfg.ssim_window < 3 or cfg.ssim_window % 2 == 0):
            raise ConfigError(f"loss.ssim_window must be an odd number of at least 3, got {cfg.ssim_window}")
        check_kl(cfg.kl)

        self.gaussian_logvar: nn.Parameter | None = None
        if cfg.recon == "gaussian":
            if cfg.gaussian_logvar not in ("scalar", "channel"):
                raise ConfigError(f"loss.gaussian_logvar is {cfg.gaussian_logvar!r} but must be scalar or channel")
            shape = () if cfg.gaussian_logvar == "scalar" else (self.image_channels,)
            # log sigma^2 = 0: sigma = 1 output-range unit at the start; learned with the model.
            self.gaussian_logvar = nn.Parameter(torch.zeros(shape))
        self.perceptual = (PerceptualDistance(cfg.perceptual, self.output_range, self.image_channels)
                           if cfg.perceptual.weight > 0 else None)
        self.latent = (LatentRegularisers(cfg, self.output_range, self.image_channels, latent_shape, self.spatial_dims)
                       if latent_shape is not None else None)
        self._range_checked = False

    # -- pieces ---------------------------------------------------------------------------------

    def beta(self, step: int) -> float:
        return kl_beta(self.cfg.kl, step)

    def _logvar_image(self) -> Tensor:
        """The gaussian log-variance, clamped, shaped to broadcast against [.., C, H, W] (or [.., C, *spatial])."""
        lv = self.gaussian_logvar.float().clamp(*GAUSSIAN_LOGVAR_RANGE)
        return lv.view(-1, *[1] * self.spatial_dims) if lv.dim() == 1 else lv

    def _check_bce_inputs(self, recon: Tensor, target: Tensor) -> None:
        if self._range_checked and recon.device.type != "cpu":
            return  # checked once: a check per step would make the host wait for the device
        for name, t in (("target", target), ("reconstruction", recon)):
            if unit_range_violation(t.detach()):
                raise ValueError(f"loss.recon is bce but the {name} has values outside [0, 1]; "
                                 f"feed images scaled to [0, 1] and use model.output=sigmoid")
        self._range_checked = True

    def recon_elementwise(self, recon: Tensor, target: Tensor) -> Tensor:
        """The element-wise reconstruction loss, float32, shaped [L, B, C, H, W].

        recon [L*B, C, H, W] (sample-major), target [B, C, H, W]: the target is broadcast over the L samples."""
        b = target.shape[0]
        if recon.shape[0] % b or recon.shape[1:] != target.shape[1:]:
            raise ValueError(f"reconstruction {tuple(recon.shape)} does not match target {tuple(target.shape)} "
                             f"(expected [L*B, C, H, W] with B = {b})")
        with torch.autocast(recon.device.type, enabled=False):
            r = recon.float().view(-1, *target.shape)
            t = target.float().unsqueeze(0)
            kind = self.cfg.recon
            if kind == "l1":
                return (r - t).abs()
            if kind == "mse":
                return (r - t).square()
            if kind == "bce":
                self._check_bce_inputs(recon, target)
                return bce_elementwise(r, t.clamp(0.0, 1.0).expand_as(r))
            lv = self._logvar_image()
            return 0.5 * (lv + (r - t).square() * torch.exp(-lv) + LOG_2PI)

    def recon_per_image(self, recon: Tensor, target: Tensor) -> Tensor:
        """[B]: the element-wise reconstruction loss summed over C*H*W, averaged over the L samples.

        For gaussian and bce this is -log p(x|z) in nats of the continuous density / continuous Bernoulli;
        the weighted `recon` term is this divided by C*H*W. For bits/dim use log_px_z (discretised)."""
        return self.recon_elementwise(recon, target).flatten(2).sum(2).mean(0)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, out, target: Tensor, step: int, vae: nn.Module | None = None) -> LossResult:
        """out: a VAEOutput (recon [L*B,C,H,W] sample-major, mu/logvar [B, *latent]); target [B,C,H,W] in
        the model's output range; step: optimizer steps already taken (drives beta and the noise warm-up); vae: the
        model that made `out`, for the latent regularisers (which decode again); None leaves them out."""
        cfg = self.cfg
        device = target.device
        recon = out.recon
        b = target.shape[0]
        terms: dict[str, Tensor] = {}
        reps = recon.shape[0] // b

        perc = None
        if self.perceptual is not None:  # first, under the caller's autocast: the backbone runs in bf16/fp16
            perc = self.perceptual(recon, target)

        with torch.autocast(device.type, enabled=False):
            rec = self.recon_elementwise(recon, target).mean()
            total = cfg.recon_weight * rec
            image_total = total  # the image terms alone: what the latent alignment's adaptive weight is measured by
            terms["recon"] = rec

            if out.logvar is not None:  # a Gaussian bottleneck (a quantized one has no KL)
                kl_bd = kl_per_dim(out.mu, out.logvar)  # [B, D]
                kl_d = kl_bd.mean(0)  # [D] batch mean
                kl_raw = kl_d.sum()
                kl_pen = kl_d.clamp(min=cfg.kl.free_bits_nats).sum() if cfg.kl.free_bits_nats > 0 else kl_raw
                beta = self.beta(step)
                kl_weighted = beta * kl_pen
                total = total + kl_weighted
                terms["kl"] = kl_raw
                terms["kl_weighted"] = kl_weighted
                terms["beta"] = torch.full((), beta, device=device)  # a fill kernel, no host-to-device copy
            else:
                kl_d = torch.zeros(0, device=device)
            if out.quant_loss is not None:  # the quantizers' commitment (+ codebook) loss replaces or joins the KL
                total = total + out.quant_loss
                terms["quantizer"] = out.quant_loss
                terms.update({f"quantizer_{name}": value for name, value in out.quant_terms.items()})

            if perc is not None:
                total = total + cfg.perceptual.weight * perc
                image_total = image_total + cfg.perceptual.weight * perc
                terms["perceptual"] = perc

            if cfg.ssim_weight > 0:
                recon01 = to_unit_range(recon, self.output_range)
                target01 = to_unit_range(target, self.output_range)
                t01 = target01.repeat(reps, *[1] * (target.dim() - 1)) if reps > 1 else target01
                ssim = ssim_map(recon01, t01, cfg.ssim_window, max_val=1.0).mean()  # 1-D, 2-D or 3-D
                ssim_loss = cfg.ssim_weight * (1.0 - ssim)
                total = total + ssim_loss
                image_total = image_total + ssim_loss
                terms["ssim"] = ssim
                terms["ssim_loss"] = ssim_loss

            if cfg.tv_weight > 0:
                tv = total_variation(recon).mean()
                total = total + cfg.tv_weight * tv
                image_total = image_total + cfg.tv_weight * tv
                terms["tv"] = tv

            if cfg.sparsity_weight > 0:
                sparsity = out.mu.float().abs().mean()
                total = total + cfg.sparsity_weight * sparsity
                terms["sparsity"] = sparsity

        if vae is not None and self.latent is not None and self.latent.active:  # decodes under the caller's autocast
            extra, latent_terms = self.latent(vae, out, target, step, image_total,
                                              lambda r, t: self.recon_elementwise(r, t).mean())
            total = total + extra
            terms.update(latent_terms)

        return LossResult(total=total, terms={k: v.detach() for k, v in terms.items()},
                          kl_per_dim=kl_d.detach())

    def active_terms(self, model) -> list[str]:
        """The terms this loss adds for `model` (the bare VAE), as printed at the start of training and stored in
        the W&B config: which of KL and the quantizer loss replaced the other, and every weighted extra."""
        cfg = self.cfg
        terms = [f"{cfg.recon_weight:g} x recon ({cfg.recon})"]
        if getattr(model, "quantizer", None) is None:
            kl = cfg.kl
            terms.append(f"beta x KL ({kl.schedule} to {kl.weight:g}"
                         + (f", free bits {kl.free_bits_nats:g} nats" if kl.free_bits_nats > 0 else "") + ")")
        from pipeline.models.quantize import quantizers  # (models import this module's package)
        for q in quantizers(model):
            what = {"vq": f"codebook + {q.commitment_weight:g} x commitment",
                    "ema": f"{q.commitment_weight:g} x commitment, EMA codebook",
                    "fsq": "no loss"}[q.kind]
            terms.append(f"quantizer {q.name} ({q.kind}, {q.num_codes} codes: {what})")
        for key, name in (("perceptual", "perceptual"), ("ssim_weight", "1 - SSIM"), ("tv_weight", "TV"),
                          ("sparsity_weight", "L1(mu)")):
            weight = cfg.perceptual.weight if key == "perceptual" else getattr(cfg, key)
            if weight > 0:
                terms.append(f"{weight:g} x {name}")
        if cfg.adversarial.weight > 0:
            terms.append(f"{cfg.adversarial.weight:g} x adversarial ({cfg.adversarial.loss})")
        if self.latent is not None:
            terms += self.latent.active_terms()
        return terms

    # -- evaluation -----------------------------------------------------------------------------

    def log_px_z(self, recon: Tensor, target: Tensor, log_scale: float | Tensor | None = None) -> Tensor:
        """log p(x | z) per decoded sample in nats: recon [L*B, C, H, W] (sample-major), target [B, ...]
        in the output range -> [L*B]. Sum over C*H*W of:

        - gaussian: discretised Gaussian (256 bins per sub-pixel on the output range, edge bins to +-inf)
          with the learned sigma, or `log_scale` (log sigma) when given;
        - mse: discretised Gaussian with a fixed sigma, log sigma = `log_scale` (required: e.g.
          fixed_log_scale('mse', mean recon term) = log RMS error, the maximum-likelihood fixed sigma);
        - l1: discretised Laplace with a fixed scale b, log b = `log_scale` (required; fixed_log_scale('l1', ...)
          = log mean |error|);
        - bce: continuous Bernoulli log-likelihood x log p + (1-x) log(1-p) on [0, 1] (not discretised;
          see bernoulli_log_prob).
        Scales are in output-range units. bits/dim = -log p / (C*H*W*ln 2).
        """
        reps = recon.shape[0] // target.shape[0]
        with torch.autocast(recon.device.type, enabled=False):
            r = recon.float().view(reps, *target.shape)
            t = target.float().unsqueeze(0).expand_as(r)
            kind = self.cfg.recon
            if kind == "bce":
                lp = bernoulli_log_prob(t.clamp(0.0, 1.0), r)
            else:
                if log_scale is None:
                    if kind != "gaussian":
                        raise ValueError(f"log_px_z for loss.recon={kind} needs log_scale (the fixed scale of the "
                                         f"discretised {'Laplace' if kind == 'l1' else 'Gaussian'}); "
                                         f"see fixed_log_scale")
                    log_scale = 0.5 * self._logvar_image()
                fn = discretized_laplace_log_prob if kind == "l1" else discretized_gaussian_log_prob
                lp = fn(t, r, log_scale, self.output_range)
            return lp.flatten(2).sum(2).flatten()

    def neg_elbo(self, out, target: Tensor, log_scale: float | Tensor | None = None) -> Tensor:
        """[B] negative ELBO in nats: -mean_l log p(x | z_l) (log_px_z, discretised) + KL summed over the
        latent dimensions (closed form; beta = 1, no free bits). Divide by C*H*W*ln 2 for bits/dim."""
        b = target.shape[0]
        lp = self.log_px_z(out.recon, target, log_scale).view(-1, b).mean(0)
        return -lp + kl_per_dim(out.mu, out.logvar).sum(1)

    def iwae_log_weights(self, out, target: Tensor, log_scale: float | Tensor | None = None) -> Tensor:
        """[K, B] log importance weights log p(x|z_k) + log p(z_k) - log q(z_k|x) for an output decoded from
        K = recon.shape[0] // B sample-major samples (build the model with samples_per_input=K, or call
        reparameterize(mu, logvar, K) and decode). Feed to iwae_bound / iwae_bounds."""
        return log_importance_weights(self.log_px_z(out.recon, target, log_scale), out.z, out.mu, out.logvar)


