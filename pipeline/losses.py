"""The VAE objective: reconstruction + beta-weighted KL + optional perceptual / SSIM / TV / sparsity terms,
and the likelihood helpers that evaluation needs (negative ELBO, IWAE, bits per dimension).

    loss_fn = VAELoss(cfg.loss, model.output_range, image_channels=3)    # ConfigError on a bad combination
    result = loss_fn(model(x), x, step)           # LossResult(total, terms, kl_per_dim)
    result.total.backward()

Reductions (the units every weight in a recipe multiplies):

    total = recon_weight      * recon         per-sub-pixel mean of the reconstruction loss, also averaged
                                              over the samples_per_input samples of z (see below)
          + kl_weighted                       beta(step) * sum_d max(free_bits, mean_b KL_bd)   (nats / image)
          + perceptual.weight * perceptual    channel-normalised feature distance of a frozen timm backbone
          + ssim_loss                         ssim_weight * (1 - SSIM), SSIM on images in [0, 1]
          + tv_weight         * tv            total variation per pixel (see `total_variation`)
          + sparsity_weight   * sparsity      mean |mu| over batch and latent dimensions

- `recon` is the element-wise loss e(x_hat, x) averaged over every sub-pixel (C*H*W) of every image and
  every Monte-Carlo sample: l1 |x_hat - x|, mse (x_hat - x)^2, bce the binary cross-entropy (images in
  [0, 1]), gaussian the negative log-density 0.5*(log s^2 + (x_hat - x)^2 / s^2 + log 2pi) with a learned
  log-variance log s^2 (one scalar, or one per channel) that this module owns as an nn.Parameter, so it
  is optimized together with the model. Pixel differences (l1, mse, gaussian, tv) are taken in the
  model's output range (like the seeds: seed 000's 5 x L1 was on [-1, 1] images); terms with absolute
  constants (SSIM, the perceptual backbone, bce) see images converted to [0, 1].
  The per-image SUM of the same element-wise loss (nats for gaussian and bce) is `recon_per_image`.
- The KL term is the closed-form KL(N(mu, diag sigma^2) || N(0, I)) summed over the latent dimensions
  and averaged over the batch, i.e. nats per image (seed 002's / AntixK's convention). `kl` in the
  terms is that raw value (no free bits, no beta); `kl_weighted` is what enters the total.
- With samples_per_input L > 1 the recon is [L*B, ...] sample-major; the target is broadcast over the
  L samples and every image term is averaged over them (seed 001's `no_of_sample`).
- `step` = optimizer steps already taken (0 at the first step); it only drives the beta schedule.

forward() never calls .item() or anything else that waits for the device, with one exception: bce
checks once (and on every CPU call) that the values are inside [0, 1]. Every term is computed in
float32 with autocast disabled, so bf16/fp16 training changes only the networks' precision.

Likelihood conventions (evaluation, issue 6) are documented at `log_px_z`; bits/dim = nats / (C*H*W*ln 2).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import kornia
import torch
from torch import Tensor, nn

from pipeline.config import ConfigError, KLConfig, LossConfig, PerceptualConfig

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
LOG_2PI = math.log(2.0 * math.pi)
RECON_KINDS = ("l1", "mse", "bce", "gaussian")
GAUSSIAN_LOGVAR_RANGE = (-15.0, 10.0)
"""Clamp of the learned log-variance (nats) of the gaussian likelihood: sigma from 5.5e-4 to 148 in
output-range units, so the continuous density cannot run to -inf on a perfect reconstruction."""
BCE_LOG_MIN = -100.0
"""log(p) and log(1-p) are clamped here, as torch.nn.functional.binary_cross_entropy does."""
PIXEL_BINS = 256
"""8-bit data: 256 values per sub-pixel for the discretised likelihoods."""


# --------------------------------------------------------------------------------------------
# KL and the beta schedules
# --------------------------------------------------------------------------------------------


def kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """Closed-form KL(N(mu, exp(logvar)) || N(0, 1)) per latent dimension, in nats, float32.

    mu, logvar: [B, *latent_shape] -> [B, D] with D = prod(latent_shape):
    KL_bd = 0.5 * (mu^2 + exp(logvar) - 1 - logvar).
    """
    mu = mu.float().flatten(1)
    logvar = logvar.float().flatten(1)
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)


def kl_beta(cfg: KLConfig, step: int) -> float:
    """beta at `step` (optimizer steps already taken, 0 at the first step).

    constant: weight.  linear: weight * min(1, step / warmup_steps) (weight at once when warmup_steps=0).
    cyclical (Fu et al. 2019, "Cyclical Annealing Schedule"): with tau = (step mod cycle_steps) /
    cycle_steps, beta = weight * min(1, tau / cycle_ramp_fraction): a linear ramp from 0 over the first
    cycle_ramp_fraction of every cycle, then held at weight for the rest of it.
    """
    w = float(cfg.weight)
    if cfg.schedule == "constant":
        return w
    if cfg.schedule == "linear":
        return w if cfg.warmup_steps <= 0 else w * min(1.0, step / cfg.warmup_steps)
    if cfg.schedule == "cyclical":
        tau = (step % cfg.cycle_steps) / cfg.cycle_steps
        return w * min(1.0, tau / cfg.cycle_ramp_fraction)
    raise ConfigError(f"loss.kl.schedule is {cfg.schedule!r} but must be one of constant, linear, cyclical")


def _check_kl(cfg: KLConfig) -> None:
    if cfg.weight < 0:
        raise ConfigError(f"loss.kl.weight must be 0 or more, got {cfg.weight}")
    if cfg.schedule not in ("constant", "linear", "cyclical"):
        raise ConfigError(f"loss.kl.schedule is {cfg.schedule!r} but must be one of constant, linear, cyclical")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"loss.kl.warmup_steps must be 0 or more, got {cfg.warmup_steps}")
    if cfg.schedule == "cyclical" and cfg.cycle_steps < 1:
        raise ConfigError(f"loss.kl.cycle_steps must be at least 1, got {cfg.cycle_steps}")
    if cfg.schedule == "cyclical" and not 0 < cfg.cycle_ramp_fraction <= 1:
        raise ConfigError(f"loss.kl.cycle_ramp_fraction must be in (0, 1], got {cfg.cycle_ramp_fraction}")
    if cfg.free_bits_nats < 0:
        raise ConfigError(f"loss.kl.free_bits_nats must be 0 or more, got {cfg.free_bits_nats}")


# --------------------------------------------------------------------------------------------
# Image terms
# --------------------------------------------------------------------------------------------


def to_unit_range(x: Tensor, output_range: tuple[float, float]) -> Tensor:
    """Images in output_range -> [0, 1] (float32)."""
    lo, hi = float(output_range[0]), float(output_range[1])
    x = x.float()
    return x if (lo, hi) == (0.0, 1.0) else (x - lo) / (hi - lo)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic L1 total variation per pixel, per image: [N, C, H, W] -> [N].

    kornia.losses.total_variation(x, reduction='sum') gives, per (image, channel), the sum of
    |x[i+1, j] - x[i, j]| over (H-1)*W vertical pairs plus |x[i, j+1] - x[i, j]| over H*(W-1)
    horizontal pairs. We divide that by H*W and average over channels, so the value does not grow with
    the image size: a constant image gives 0, and a checkerboard of values a, b gives
    |a - b| * (H*(W-1) + (H-1)*W) / (H*W) (-> 2|a - b| for large images).
    """
    n, c, h, w = x.shape
    return kornia.losses.total_variation(x.float(), reduction="sum").mean(1) / (h * w)


def _unit_range_violation(t: Tensor, tol: float = 1e-4) -> bool:
    """True when a value is outside [0, 1] by more than tol (NaN passes: the non-finite guard handles it)."""
    return bool(((t < -tol) | (t > 1.0 + tol)).any())


def _bce_elementwise(p: Tensor, t: Tensor) -> Tensor:
    """-(t log p + (1-t) log(1-p)) with the logs clamped at -100 like torch's binary_cross_entropy,
    written out so that a NaN input gives NaN (for the trainer's non-finite guard) instead of raising."""
    p = p.float()
    t = t.float()
    return -(t * torch.log(p).clamp(min=BCE_LOG_MIN) + (1.0 - t) * torch.log1p(-p).clamp(min=BCE_LOG_MIN))


# --------------------------------------------------------------------------------------------
# Likelihood helpers (evaluation: negative ELBO, IWAE, bits per dimension)
# --------------------------------------------------------------------------------------------


def bits_per_dim(nats: Tensor | float, dims: int) -> Tensor | float:
    """Negative log-likelihood in nats per image -> bits per sub-pixel: nats / (dims * ln 2), dims = C*H*W."""
    return nats / (dims * LN2)


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over every dimension but the first: [N, *latent] -> [N] (nats, float32)."""
    z = z.float().flatten(1)
    return -0.5 * (z.square() + LOG_2PI).sum(1)


def log_normal_diag(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag exp(logvar)) summed over every dimension but the first: [N, ...] -> [N] (nats).

    mu/logvar broadcast against z; for sample-major z of L samples per input pass mu.repeat(L, ...)."""
    z, mu, logvar = z.float().flatten(1), mu.float().flatten(1), logvar.float().flatten(1)
    return -0.5 * ((z - mu).square() * torch.exp(-logvar) + logvar + LOG_2PI).sum(1)


def iwae_bound(log_w: Tensor) -> Tensor:
    """Importance-weighted bound (Burda et al. 2016) from log weights [K, B]: logsumexp_k - log K -> [B].

    log_w[k, i] = log p(x_i | z_ki) + log p(z_ki) - log q(z_ki | x_i); K = 1 gives the ELBO estimate."""
    return torch.logsumexp(log_w.double(), dim=0) - math.log(log_w.shape[0])


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 - exp(d)) for d <= 0, accurate on both sides of d = -ln 2 (Maechler 2012)."""
    return torch.where(d > -LN2, torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def _gaussian_log_cdf(u: Tensor) -> Tensor:
    return torch.special.log_ndtr(u)


def _gaussian_log_pdf(u: Tensor) -> Tensor:
    return -0.5 * (u.square() + LOG_2PI)


def _laplace_log_cdf(u: Tensor) -> Tensor:
    # F(u) = exp(u)/2 for u < 0, 1 - exp(-u)/2 otherwise; both branches are finite everywhere.
    return torch.where(u < 0, u.clamp(max=0.0) - LN2, torch.log1p(-0.5 * torch.exp(-u.clamp(min=0.0))))


def _laplace_log_pdf(u: Tensor) -> Tensor:
    return -u.abs() - LN2


def _discretized_log_prob(x, mean, log_scale, data_range, bins, log_cdf, log_pdf) -> Tensor:
    """log P(x's bin) for a symmetric location-scale distribution, bins of equal width on data_range,
    with the first and last bins extended to -inf and +inf (PixelCNN++ / NVAE), so the bin
    probabilities of a pixel sum to exactly 1 over its `bins` values."""
    lo, hi = float(data_range[0]), float(data_range[1])
    x, mean = x.float(), mean.float()
    log_scale = torch.as_tensor(log_scale, dtype=torch.float32, device=mean.device)
    width = (hi - lo) / (bins - 1)
    k = torch.round((x - lo) / width).clamp(0, bins - 1)  # snap to the 8-bit grid
    centre = lo + k * width
    inv = torch.exp(-log_scale)
    upper = (centre + 0.5 * width - mean) * inv
    lower = (centre - 0.5 * width - mean) * inv
    # F(upper) - F(lower), evaluated on the side of the mean where the CDF is small (F(-u) = 1 - F(u)).
    flip = centre > mean
    a = torch.where(flip, -upper, lower)
    b = torch.where(flip, -lower, upper)
    log_b = log_cdf(b)
    exact = log_b + _log1mexp(log_cdf(a) - log_b)
    # Bins narrow against the scale: the midpoint rule is exact to ~(b-a)^2 and avoids cancellation.
    approx = log_pdf(0.5 * (a + b)) + torch.log(b - a)
    mid = torch.where((b - a < 1e-3) | ~torch.isfinite(exact), approx, exact)
    return torch.where(k == 0, log_cdf(upper), torch.where(k == bins - 1, log_cdf(-lower), mid))


def discretized_gaussian_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor | float,
                                  data_range: tuple[float, float] = (-1.0, 1.0), bins: int = PIXEL_BINS) -> Tensor:
    """Element-wise log-probability (nats) of 8-bit data under a discretised Gaussian N(mean, exp(log_scale)^2).

    x holds values of the `bins`-point grid on data_range (uint8 / 255 mapped into data_range; other values
    are snapped to the nearest grid point). Bin i covers [c_i - w/2, c_i + w/2] with w = (hi - lo)/(bins-1),
    except the edge bins, which extend to -inf and +inf, so sum over the bins = 1 for every (mean, scale).
    log_scale = log sigma in data_range units (a sigma learned on [-1, 1] images is used as such)."""
    return _discretized_log_prob(x, mean, log_scale, data_range, bins, _gaussian_log_cdf, _gaussian_log_pdf)


def discretized_laplace_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor | float,
                                 data_range: tuple[float, float] = (-1.0, 1.0), bins: int = PIXEL_BINS) -> Tensor:
    """As discretized_gaussian_log_prob, for a Laplace(mean, b = exp(log_scale)) density."""
    return _discretized_log_prob(x, mean, log_scale, data_range, bins, _laplace_log_cdf, _laplace_log_pdf)


def bernoulli_log_prob(x01: Tensor, p: Tensor) -> Tensor:
    """Element-wise x log p + (1 - x) log(1 - p) for x, p in [0, 1] (nats; logs clamped at -100).

    This is the *continuous* Bernoulli/BCE convention (seed 001): for grey values x it is not a normalised
    distribution over the 256 pixel values, so bits/dim from it are not comparable with the literature."""
    return -_bce_elementwise(p, x01)


def fixed_log_scale(recon_kind: str, recon_term: float | Tensor) -> float:
    """The maximum-likelihood scale of a fixed-scale likelihood from the mean reconstruction error.

    l1 -> Laplace b = mean |x_hat - x|, mse -> Gaussian sigma = sqrt(mean (x_hat - x)^2), both in output-range
    units; `recon_term` is exactly the `recon` term a VAELoss logs for that kind (per-sub-pixel mean), e.g.
    its mean over the evaluated split. Returns log b / log sigma, floored at a tenth of an 8-bit bin on [0, 1]."""
    value = float(recon_term)
    if recon_kind == "l1":
        scale = value
    elif recon_kind == "mse":
        scale = math.sqrt(max(value, 0.0))
    else:
        raise ValueError(f"fixed_log_scale is for l1/mse likelihoods, not {recon_kind!r}")
    return math.log(max(scale, 0.1 / 255))


# --------------------------------------------------------------------------------------------
# The loss module
# --------------------------------------------------------------------------------------------


@dataclass
class LossResult:
    total: Tensor
    """Scalar with grad: the weighted sum that is backpropagated."""
    terms: dict[str, Tensor]
    """Detached float32 scalars by name: recon, kl, kl_weighted, beta always; perceptual, ssim, ssim_loss,
    tv, sparsity when their weight is > 0. Raw (unweighted) values except kl_weighted (= beta * free-bits KL)
    and ssim_loss (= ssim_weight * (1 - ssim)), which are the amounts that entered the total."""
    kl_per_dim: Tensor
    """[D] detached: batch-mean KL per latent dimension in nats (no free bits, no beta)."""


class VAELoss(nn.Module):
    """recon + KL + perceptual + SSIM + TV + sparsity, configured by the recipe's `loss:` section.

    Parameters: only the gaussian likelihood's learned log-variance (`gaussian_logvar`, shape [] or [C]),
    which the trainer optimizes with the model. The perceptual backbone is frozen and deliberately kept
    out of parameters() and state_dict() (see pipeline.losses.PerceptualDistance)."""

    def __init__(self, cfg: LossConfig, output_range: tuple[float, float], image_channels: int):
        super().__init__()
        self.cfg = cfg
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
        if cfg.ssim_weight > 0 and (cfg.ssim_window < 3 or cfg.ssim_window % 2 == 0):
            raise ConfigError(f"loss.ssim_window must be an odd number of at least 3, got {cfg.ssim_window}")
        _check_kl(cfg.kl)

        self.gaussian_logvar: nn.Parameter | None = None
        if cfg.recon == "gaussian":
            if cfg.gaussian_logvar not in ("scalar", "channel"):
                raise ConfigError(f"loss.gaussian_logvar is {cfg.gaussian_logvar!r} but must be scalar or channel")
            shape = () if cfg.gaussian_logvar == "scalar" else (self.image_channels,)
            # log sigma^2 = 0: sigma = 1 output-range unit at the start; learned with the model.
            self.gaussian_logvar = nn.Parameter(torch.zeros(shape))
        self.perceptual = (PerceptualDistance(cfg.perceptual, self.output_range, self.image_channels)
                           if cfg.perceptual.weight > 0 else None)
        self._range_checked = False

    # -- pieces ---------------------------------------------------------------------------------

    def beta(self, step: int) -> float:
        return kl_beta(self.cfg.kl, step)

    def _logvar_image(self) -> Tensor:
        """The gaussian log-variance, clamped, shaped to broadcast against [.., C, H, W]."""
        lv = self.gaussian_logvar.float().clamp(*GAUSSIAN_LOGVAR_RANGE)
        return lv.view(-1, 1, 1) if lv.dim() == 1 else lv

    def _check_bce_inputs(self, recon: Tensor, target: Tensor) -> None:
        if self._range_checked and recon.device.type != "cpu":
            return  # checked once: a check per step would make the host wait for the device
        for name, t in (("target", target), ("reconstruction", recon)):
            if _unit_range_violation(t.detach()):
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
                return _bce_elementwise(r, t.clamp(0.0, 1.0).expand_as(r))
            lv = self._logvar_image()
            return 0.5 * (lv + (r - t).square() * torch.exp(-lv) + LOG_2PI)

    def recon_per_image(self, recon: Tensor, target: Tensor) -> Tensor:
        """[B]: the element-wise reconstruction loss summed over C*H*W, averaged over the L samples.

        For gaussian and bce this is -log p(x|z) in nats of the continuous density / continuous Bernoulli;
        the weighted `recon` term is this divided by C*H*W. For bits/dim use log_px_z (discretised)."""
        return self.recon_elementwise(recon, target).flatten(2).sum(2).mean(0)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, out, target: Tensor, step: int) -> LossResult:
        """out: a VAEOutput (recon [L*B,C,H,W] sample-major, mu/logvar [B, *latent]); target [B,C,H,W] in
        the model's output range; step: optimizer steps already taken (drives beta)."""
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
            terms["recon"] = rec

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

            if perc is not None:
                total = total + cfg.perceptual.weight * perc
                terms["perceptual"] = perc

            if cfg.ssim_weight > 0:
                recon01 = to_unit_range(recon, self.output_range)
                target01 = to_unit_range(target, self.output_range)
                t01 = target01.repeat(reps, 1, 1, 1) if reps > 1 else target01
                ssim = kornia.metrics.ssim(recon01, t01, cfg.ssim_window, max_val=1.0).mean()
                ssim_loss = cfg.ssim_weight * (1.0 - ssim)
                total = total + ssim_loss
                terms["ssim"] = ssim
                terms["ssim_loss"] = ssim_loss

            if cfg.tv_weight > 0:
                tv = total_variation(recon).mean()
                total = total + cfg.tv_weight * tv
                terms["tv"] = tv

            if cfg.sparsity_weight > 0:
                sparsity = out.mu.float().abs().mean()
                total = total + cfg.sparsity_weight * sparsity
                terms["sparsity"] = sparsity

        return LossResult(total=total, terms={k: v.detach() for k, v in terms.items()},
                          kl_per_dim=kl_d.detach())

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
        reparameterize(mu, logvar, K) and decode). Feed to iwae_bound."""
        b = target.shape[0]
        k = out.z.shape[0] // b
        mu = out.mu.repeat(k, *([1] * (out.mu.dim() - 1)))
        logvar = out.logvar.repeat(k, *([1] * (out.logvar.dim() - 1)))
        log_w = self.log_px_z(out.recon, target, log_scale) + log_standard_normal(out.z) - log_normal_diag(
            out.z, mu, logvar)
        return log_w.view(k, b)


# --------------------------------------------------------------------------------------------
# Perceptual distance
# --------------------------------------------------------------------------------------------


class PerceptualDistance(nn.Module):
    """Distance between channel-normalised feature maps of a frozen timm backbone (LPIPS without the
    learned linear layers): for each feature level l with weight w_l,

        f_hat = f / (||f||_2 over channels + 1e-10)                      (unit vectors, like LPIPS)
        d_l   = mean over (image, h, w) of
                sum_c (f_hat_r - f_hat_t)^2            distance: l2 -- LPIPS without its linear layers, in [0, 4]
                sum_c |f_hat_r - f_hat_t| / sqrt(C_l)  distance: l1 -- the L1 norm scaled to the L2 norm's scale:
                                                       <= ||f_hat_r - f_hat_t||_2 <= 2 (Cauchy-Schwarz), equal to
                                                       it when the difference is spread evenly over channels,
                                                       so the value does not grow with the layer's width
        d     = sum_l w_l * d_l.

    Inputs in the model's output range are converted to [0, 1], then normalised with the backbone's own
    pretrained_cfg mean/std; 1-channel images are repeated to RGB. Target features are computed under
    no_grad; gradients flow through the frozen backbone into the reconstruction.

    The backbone is NOT a registered submodule: it stays out of parameters() (so no optimizer or DDP ever
    sees it) and out of state_dict() (checkpoints do not carry tens of MB of frozen weights; it is rebuilt
    from loss.perceptual.weights when the loss is built). `.to()/.cuda()/.cpu()` of this module or of any
    parent move it along (see `_apply`); dtype conversions (.half(), .to(bfloat16)) do not touch it: it stays
    float32 and runs in bf16/fp16 under autocast. It is always in eval mode, whatever .train() says.
    """

    def __init__(self, cfg: PerceptualConfig, output_range: tuple[float, float], image_channels: int = 3):
        super().__init__()
        from pipeline.perceptual import build_backbone  # perceptual.py also holds the classifier trainer

        if image_channels not in (1, 3):
            raise ConfigError(f"loss.perceptual needs 1- or 3-channel images, got model.in_channels={image_channels}")
        if cfg.distance not in ("l1", "l2"):
            raise ConfigError(f"loss.perceptual.distance is {cfg.distance!r} but must be l1 or l2")
        if cfg.layer_weights and len(cfg.layer_weights) != len(cfg.layers):
            raise ConfigError("loss.perceptual.layer_weights needs one weight per entry of loss.perceptual.layers")
        backbone, mean, std = build_backbone(cfg)
        backbone.eval().requires_grad_(False)
        object.__setattr__(self, "backbone", backbone)  # plain attribute: not registered (see class doc)
        object.__setattr__(self, "_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.name = cfg.backbone
        self.weights_source = cfg.weights
        self.distance = cfg.distance
        self.layer_weights = [float(w) for w in (cfg.layer_weights or [1.0] * len(cfg.layers))]
        self.output_range = (float(output_range[0]), float(output_range[1]))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = fn(torch.empty(0)).device  # where .to()/.cuda()/.cpu() sends tensors; dtype is ignored
        self.backbone.to(device)
        object.__setattr__(self, "_mean", self._mean.to(device))
        object.__setattr__(self, "_std", self._std.to(device))
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def extra_repr(self) -> str:
        return (f"backbone={self.name} (weights: {self.weights_source}; frozen, not in parameters/state_dict), "
                f"distance={self.distance}, layer_weights={self.layer_weights}")

    def features(self, x01: Tensor) -> list[Tensor]:
        """Images in [0, 1] [N, C, H, W] -> channel-normalised float32 feature maps, one per layer."""
        if x01.shape[1] == 1:
            x01 = x01.expand(-1, 3, -1, -1)
        x = (x01.float() - self._mean) / self._std
        feats = self.backbone(x)
        return [f / (f.float().norm(dim=1, keepdim=True) + 1e-10) for f in (ff.float() for ff in feats)]

    def forward(self, recon: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """recon [L*B, C, H, W] (sample-major), target [B, C, H, W], both in the output range -> the distance:
        a scalar (reduction='mean', averaged over images and samples)
        or per reconstruction [L*B] (reduction='none')."""
        recon = to_unit_range(recon, self.output_range)
        target = to_unit_range(target, self.output_range)
        b = target.shape[0]
        reps = recon.shape[0] // b
        # The backbone runs under the caller's autocast, if any (bf16 convolutions on fp32 weights).
        with torch.no_grad():
            ft = self.features(target)
        fr = self.features(recon)
        per_image = recon.new_zeros(recon.shape[0], dtype=torch.float32)
        for w, a, t in zip(self.layer_weights, fr, ft):
            diff = a.view(reps, *t.shape) - t.unsqueeze(0)
            d = diff.abs().sum(2) / math.sqrt(t.shape[1]) if self.distance == "l1" else diff.square().sum(2)
            per_image = per_image + w * d.flatten(2).mean(2).flatten()
        return per_image.mean() if reduction == "mean" else per_image
