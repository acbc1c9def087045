"""Likelihoods and the bounds built from them: the element-wise reconstruction losses' densities, the
discretised log-probabilities of 8-bit data, log-densities of the latent Gaussians, and the ONE
importance-weighting helper (log weights, IWAE bounds) that both the loss module and
`python -m pipeline.evaluate` use.

Conventions: nats per image unless a name says otherwise; bits/dim = nats / (C*H*W*ln 2); every
function computes in float32 (the IWAE bounds in float64) whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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


def unit_range_violation(t: Tensor, tol: float = 1e-4) -> bool:
    """True when a value is outside [0, 1] by more than tol (NaN passes: the non-finite guard handles it)."""
    return bool(((t < -tol) | (t > 1.0 + tol)).any())


def bce_elementwise(p: Tensor, t: Tensor) -> Tensor:
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


def log_importance_weights(log_px: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """[K, B] log importance weights log p(x|z_k) + (log p(z_k) - log q(z_k|x)) (nats, float32).

    log_px: [K*B] or [K, B], log p(x|z) of each decoded sample; z: [K*B, *latent] sample-major (sample k of
    image i at row k*B + i); mu, logvar: [B, *latent], the posterior of each image (broadcast over the K
    samples here). Feed the result to iwae_bounds / iwae_bound."""
    b = mu.shape[0]
    k = z.shape[0] // b
    reps = (k,) + (1,) * (mu.dim() - 1)
    log_ratio = log_standard_normal(z) - log_normal_diag(z, mu.repeat(reps), logvar.repeat(reps))
    return log_px.reshape(k, b) + log_ratio.view(k, b)


def iwae_group_sizes(k: int) -> list[int]:
    """1, 2, 4, ... (the powers of two dividing k), then k: each size divides the next one."""
    sizes, g = [], 1
    while k % g == 0 and g < k:
        sizes.append(g)
        g *= 2
    return sizes + [k]


def iwae_bounds(log_w: Tensor) -> dict[int, Tensor]:
    """log-likelihood lower bounds [B] (float64) for each group size g of iwae_group_sizes(K), from log
    weights [K, B].

    For group size g the K samples form K/g disjoint groups; the bound is the mean over groups of
    logsumexp(group) - log g (Burda et al.'s IWAE_g, averaged). g = 1 is the Monte-Carlo ELBO and g = K the
    IWAE_K bound (= iwae_bound). Because every size divides the next, log-mean-exp over a union of groups
    is >= the mean of the groups' values (Jensen), so the bounds never decrease as g grows, for any weights."""
    k, b = log_w.shape
    log_w = log_w.double()
    return {g: (torch.logsumexp(log_w.view(k // g, g, b), dim=1) - math.log(g)).mean(0)
            for g in iwae_group_sizes(k)}


def iwae_bound(log_w: Tensor) -> Tensor:
    """The IWAE_K bound (Burda et al. 2016) [B] from log weights [K, B]: logsumexp_k - log K (float64), the
    largest group of iwae_bounds. K = 1 gives the ELBO estimate."""
    return iwae_bounds(log_w)[log_w.shape[0]]


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

    This is the *continuous* Bernoulli/BCE convention (the DCGAN dog VAE's): for grey values x it is not a normalised
    distribution over the 256 pixel values, so bits/dim from it are not comparable with the literature."""
    return -bce_elementwise(p, x01)


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

