"""KL divergence of the diagonal-Gaussian posterior from N(0, I), and the beta schedules."""

from __future__ import annotations

from torch import Tensor

from pipeline.config import ConfigError, KLConfig



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


def check_kl(cfg: KLConfig) -> None:
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

