"""The loss stack against known answers: closed-form KL, beta schedules, free bits, SSIM, TV, the
reconstruction likelihoods and their reductions, the original flowers and ResNet VAEs' totals, and the evaluation likelihoods."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, KLConfig, LossConfig, PerceptualConfig
from pipeline.objective import VAELoss
from pipeline.objective.image import ssim, total_variation
from pipeline.objective.kl import kl_beta, kl_per_dim
from pipeline.objective.likelihood import (
    bernoulli_log_prob,
    bits_per_dim,
    discretized_gaussian_log_prob,
    discretized_laplace_log_prob,
    fixed_log_scale,
    iwae_bound,
    log_normal_diag,
    log_standard_normal,
)
from pipeline.models.base import VAEOutput

TANH = (-1.0, 1.0)
SIGMOID = (0.0, 1.0)


def output(recon, mu, logvar=None, z=None):
    logvar = torch.zeros_like(mu) if logvar is None else logvar
    z = torch.zeros(recon.shape[0], *mu.shape[1:]) if z is None else z
    return VAEOutput(recon=recon, mu=mu, logvar=logvar, z=z)


def images(b=2, c=3, h=16, w=16, rng=(-1.0, 1.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = rng
    return torch.rand(b, c, h, w, generator=g) * (hi - lo) + lo


# ------------------------------------------------------------------------------------------------
# KL
# ------------------------------------------------------------------------------------------------


def test_kl_closed_form_matches_monte_carlo():
    """E_q[log q(z) - log p(z)] from 400k samples (seed 0) per dimension; tolerance 5 standard errors of
    the estimate (each below 0.01 nats here), i.e. a false failure has odds of about 1 in 3 million."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.0, 1.0, -2.0, 0.5]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, math.log(4.0), -1.0, 1.5]], dtype=torch.float64)
    n = 400_000
    z = mu + torch.exp(0.5 * logvar) * torch.randn(n, 4, generator=g, dtype=torch.float64)
    log_q = -0.5 * ((z - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))
    log_p = -0.5 * (z ** 2 + math.log(2 * math.pi))
    samples = log_q - log_p
    mc, se = samples.mean(0), samples.std(0) / math.sqrt(n)
    closed = kl_per_dim(mu, logvar)[0].double()
    assert (se < 0.01).all()
    assert torch.all((mc - closed).abs() <= 5 * se + 1e-12), (mc, closed, se)  # dim 0: q = p, exactly 0


def test_kl_zero_for_standard_normal_posterior():
    kl = kl_per_dim(torch.zeros(3, 7), torch.zeros(3, 7))
    assert kl.shape == (3, 7) and torch.equal(kl, torch.zeros(3, 7))


def test_kl_known_values_and_spatial_latents_flatten():
    # mu=1, sigma=2: 0.5 * (1 + 4 - 1 - ln 4);  mu=0.5, logvar=-1: 0.5 * (0.25 + e^-1 - 1 + 1)
    mu = torch.tensor([[1.0, 0.5]])
    logvar = torch.tensor([[math.log(4.0), -1.0]])
    kl = kl_per_dim(mu, logvar)
    assert kl[0, 0].item() == pytest.approx(0.5 * (4.0 - math.log(4.0)), abs=1e-6)  # 1.3068528
    assert kl[0, 1].item() == pytest.approx(0.5 * (0.25 + math.exp(-1.0)), abs=1e-6)  # 0.3089397
    # [B, C, h, w] latents: one column per latent element.
    assert kl_per_dim(torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).shape == (2, 36)


def test_kl_term_is_sum_over_dims_mean_over_batch():
    loss = VAELoss(LossConfig(), TANH, 3)
    x = images()
    mu = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])  # KL = mu^2/2 with logvar = 0
    r = loss(output(x.clone(), mu), x, step=0)
    per_dim = torch.tensor([(0.5 + 4.5) / 2, 0.0, 2.0 / 2])
    assert torch.allclose(r.kl_per_dim, per_dim)
    assert r.terms["kl"].item() == pytest.approx(per_dim.sum().item())  # 3.5 nats per image
    assert r.terms["kl_weighted"].item() == pytest.approx(3.5)  # beta = 1
    assert r.total.item() == pytest.approx(3.5)  # recon is exactly 0


def test_free_bits_clamp_the_batch_mean_per_dimension_exactly():
    lam = 0.1
    cfg = LossConfig(kl=KLConfig(weight=0.5, free_bits_nats=lam))
    loss = VAELoss(cfg, TANH, 3)
    x = images()
    targets = torch.tensor([0.02, 0.5, 2.0])  # batch-mean KL per dimension
    mu = torch.sqrt(2 * targets).repeat(2, 1).requires_grad_()  # logvar 0: KL = mu^2 / 2
    r = loss(output(x.clone(), mu), x, step=0)
    assert torch.allclose(r.kl_per_dim, targets)
    assert r.terms["kl"].item() == pytest.approx(2.52, abs=1e-6)  # raw, unclamped
    assert r.terms["kl_weighted"].item() == pytest.approx(0.5 * (lam + 0.5 + 2.0), abs=1e-6)  # 1.3
    r.total.backward()
    assert torch.all(mu.grad[:, 0] == 0)  # the dimension under lambda is not penalised at all
    assert torch.allclose(mu.grad[:, 1:], 0.5 * mu[:, 1:].detach() / 2)  # d/dmu of beta * mean_b mu^2/2


# ------------------------------------------------------------------------------------------------
# beta schedules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,kw,expected", [
    ("constant", {}, {0: 0.5, 1: 0.5, 10_000: 0.5}),
    ("linear", {"warmup_steps": 100}, {0: 0.0, 25: 0.125, 50: 0.25, 99: 0.495, 100: 0.5, 5000: 0.5}),
    ("linear", {"warmup_steps": 0}, {0: 0.5, 7: 0.5}),
    # Fu et al. 2019: tau = (step mod 100) / 100, beta = 0.5 * min(1, tau / 0.5)
    ("cyclical", {"cycle_steps": 100, "cycle_ramp_fraction": 0.5},
     {0: 0.0, 10: 0.1, 25: 0.25, 50: 0.5, 75: 0.5, 99: 0.5, 100: 0.0, 125: 0.25, 260: 0.5}),
    ("cyclical", {"cycle_steps": 40, "cycle_ramp_fraction": 1.0}, {0: 0.0, 10: 0.125, 39: 0.4875, 40: 0.0, 50: 0.125}),
])
def test_beta_schedules_at_chosen_steps(schedule, kw, expected):
    cfg = KLConfig(weight=0.5, schedule=schedule, **kw)
    for step, beta in expected.items():
        assert kl_beta(cfg, step) == pytest.approx(beta, abs=1e-12), (schedule, step)


def test_beta_reaches_the_loss_terms():
    loss = VAELoss(LossConfig(kl=KLConfig(weight=2.0, schedule="linear", warmup_steps=10)), TANH, 3)
    x = images()
    mu = torch.ones(2, 4)  # KL = 4 * 0.5 = 2 nats per image
    for step, beta in ((0, 0.0), (5, 1.0), (10, 2.0)):
        r = loss(output(x.clone(), mu), x, step)
        assert r.terms["beta"].item() == beta
        assert r.terms["kl"].item() == pytest.approx(2.0)
        assert r.terms["kl_weighted"].item() == pytest.approx(2.0 * beta)


def test_bad_kl_settings_are_config_errors():
    for kl in (KLConfig(weight=-1), KLConfig(schedule="cyclical", cycle_steps=0),
               KLConfig(schedule="cyclical", cycle_ramp_fraction=0.0), KLConfig(free_bits_nats=-0.5)):
        with pytest.raises(ConfigError, match=r"loss\.kl\."):
            VAELoss(LossConfig(kl=kl), TANH, 3)


# ------------------------------------------------------------------------------------------------
# Reconstruction terms
# ------------------------------------------------------------------------------------------------


def test_l1_and_mse_are_per_subpixel_means_in_the_output_range():
    x = images(seed=1)
    recon = images(seed=2)
    for kind, ref in (("l1", (recon - x).abs().mean()), ("mse", (recon - x).pow(2).mean())):
        loss = VAELoss(LossConfig(recon=kind, recon_weight=3.0), TANH, 3)
        r = loss(output(recon, torch.zeros(2, 4)), x, 0)
        assert r.terms["recon"].item() == pytest.approx(ref.item(), rel=1e-6)
        assert r.total.item() == pytest.approx(3.0 * ref.item(), rel=1e-6)
        per_image = loss.recon_per_image(recon, x)  # the sum over C*H*W
        assert torch.allclose(per_image / (3 * 16 * 16), ((recon - x).abs() if kind == "l1" else (recon - x) ** 2)
                              .flatten(1).mean(1))


def test_bce_matches_torch_and_refuses_tanh_and_out_of_range_values():
    x = images(rng=SIGMOID, seed=1)
    p = images(rng=SIGMOID, seed=2).clamp(0.01, 0.99)
    loss = VAELoss(LossConfig(recon="bce"), SIGMOID, 3)
    r = loss(output(p, torch.zeros(2, 4)), x, 0)
    assert r.terms["recon"].item() == pytest.approx(F.binary_cross_entropy(p, x).item(), rel=1e-6)

    with pytest.raises(ConfigError, match=r"bce.*\[0, 1\].*model\.output=sigmoid"):
        VAELoss(LossConfig(recon="bce"), TANH, 3)
    with pytest.raises(ValueError, match="target has values outside"):
        loss(output(p, torch.zeros(2, 4)), x * 2 - 1, 0)
    with pytest.raises(ValueError, match="reconstruction has values outside"):
        loss(output(p * 2 - 1, torch.zeros(2, 4)), x, 0)
    # NaN is not a range error: it must reach the trainer's non-finite guard as a NaN loss.
    assert torch.isnan(loss(output(p * float("nan"), torch.zeros(2, 4)), x, 0).total)


def test_gaussian_likelihood_value_and_learned_logvar_gets_a_gradient():
    x = images(seed=1)
    recon = images(seed=2)
    for mode, shape in (("scalar", ()), ("channel", (3,))):
        loss = VAELoss(LossConfig(recon="gaussian", gaussian_logvar=mode), TANH, 3)
        assert [n for n, _ in loss.named_parameters()] == ["gaussian_logvar"]
        assert loss.gaussian_logvar.shape == shape
        with torch.no_grad():
            loss.gaussian_logvar.fill_(math.log(0.25))  # sigma = 0.5
        r = loss(output(recon, torch.zeros(2, 4)), x, 0)
        expected = (0.5 * (math.log(0.25) + (recon - x) ** 2 / 0.25 + math.log(2 * math.pi))).mean()
        assert r.terms["recon"].item() == pytest.approx(expected.item(), rel=1e-6)
        r.total.backward()
        assert loss.gaussian_logvar.grad is not None and torch.all(loss.gaussian_logvar.grad != 0)
        # d/ds of mean 0.5 (s + e^-s err^2) = 0.5 (1 - mean err^2 / sigma^2), per channel for `channel`.
        err2 = ((recon - x) ** 2).mean(dim=(0, 2, 3))
        want = 0.5 * (1 - err2.mean() / 0.25) if mode == "scalar" else 0.5 * (1 - err2 / 0.25) / 3
        assert torch.allclose(loss.gaussian_logvar.grad, want, atol=1e-6)


def test_samples_per_input_averages_every_term_over_the_samples():
    cfg = LossConfig(recon="l1", ssim_weight=1.0, tv_weight=1.0,
                     perceptual=PerceptualConfig(weight=1.0, backbone="test_resnet", layers=[1, 2]))
    loss = VAELoss(cfg, TANH, 3)
    x = images(b=2, seed=1)
    recons = [images(b=2, seed=10 + l) for l in range(3)]
    mu = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    stacked = loss(output(torch.cat(recons), mu, z=torch.zeros(6, 4)), x, 0)  # sample-major [L*B]
    singles = [loss(output(r, mu), x, 0) for r in recons]
    for name in ("recon", "ssim", "tv", "perceptual"):
        mean = sum(s.terms[name] for s in singles) / 3
        assert stacked.terms[name].item() == pytest.approx(mean.item(), rel=1e-5), name
    assert stacked.terms["kl"].item() == pytest.approx(singles[0].terms["kl"].item())  # KL uses mu/logvar only
    assert stacked.total.item() == pytest.approx((sum(s.total for s in singles) / 3).item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# SSIM and total variation
# ------------------------------------------------------------------------------------------------


def test_ssim_of_identical_images_is_one():
    loss = VAELoss(LossConfig(ssim_weight=0.7), TANH, 3)
    x = images(h=32, w=32)
    r = loss(output(x.clone(), torch.zeros(2, 4)), x, 0)
    assert r.terms["ssim"].item() == pytest.approx(1.0, abs=1e-5)
    assert r.terms["ssim_loss"].item() == pytest.approx(0.0, abs=1e-5)


def test_ssim_constants_use_the_unit_range():
    """The same picture in [-1, 1] (tanh) and [0, 1] (sigmoid) has the same SSIM: both go to [0, 1] first."""
    a, b = images(rng=SIGMOID, seed=1, h=32, w=32), images(rng=SIGMOID, seed=2, h=32, w=32)
    s01 = VAELoss(LossConfig(ssim_weight=1.0), SIGMOID, 3)(output(a, torch.zeros(2, 4)), b, 0).terms["ssim"]
    loss11 = VAELoss(LossConfig(ssim_weight=1.0), TANH, 3)
    s11 = loss11(output(a * 2 - 1, torch.zeros(2, 4)), b * 2 - 1, 0).terms["ssim"]
    assert s01.item() == pytest.approx(s11.item(), abs=1e-6)


def test_total_variation_of_constant_and_checkerboard():
    assert torch.equal(total_variation(torch.full((2, 3, 8, 6), 0.3)), torch.zeros(2))
    h, w = 8, 6
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    board = torch.where((i + j) % 2 == 0, -1.0, 1.0).expand(2, 3, h, w)  # values a=-1, b=1
    expected = 2.0 * (h * (w - 1) + (h - 1) * w) / (h * w)  # |a-b| * pairs / pixels = 3.41667
    assert torch.allclose(total_variation(board), torch.full((2,), expected))
    loss = VAELoss(LossConfig(tv_weight=0.5), TANH, 3)
    r = loss(output(board.clone(), torch.zeros(2, 4)), board, 0)
    assert r.terms["tv"].item() == pytest.approx(expected, rel=1e-6)
    assert r.total.item() == pytest.approx(0.5 * expected, rel=1e-6)
    # Per pixel: a 4x larger checkerboard has (nearly) the same TV, not 16x.
    big = torch.where((torch.arange(4 * h)[:, None] + torch.arange(4 * w)) % 2 == 0, -1.0, 1.0)[None, None]
    assert total_variation(big).item() == pytest.approx(2.0 * (4 * h * (4 * w - 1) + (4 * h - 1) * 4 * w)
                                                        / (16 * h * w))


def test_sparsity_is_mean_abs_mu():
    loss = VAELoss(LossConfig(sparsity_weight=2.0, kl=KLConfig(weight=0.0)), TANH, 3)
    x = images()
    mu = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    r = loss(output(x.clone(), mu), x, 0)
    assert r.terms["sparsity"].item() == pytest.approx(1.5)
    assert r.total.item() == pytest.approx(3.0)


# ------------------------------------------------------------------------------------------------
# The result and the original models' totals
# ------------------------------------------------------------------------------------------------


def _ssim_by_hand(a, b, window=11, sigma=1.5):
    """SSIM of images in [0, 1] (Wang et al. 2004): Gaussian window, reflect padding, c1=(0.01)^2, c2=(0.03)^2."""
    k = torch.exp(-((torch.arange(window) - window // 2).double() ** 2) / (2 * sigma ** 2))
    k = (k / k.sum())
    k2 = (k[:, None] * k[None, :])[None, None].repeat(a.shape[1], 1, 1, 1)

    def blur(t):
        return F.conv2d(F.pad(t.double(), [window // 2] * 4, mode="reflect"), k2, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))).mean()


def test_seed_004_total_alpha_recon_kl_ssim_sparse():
    """The structure-file ResNet VAE: alpha * recon + kld_weight * KL + beta * (1 - SSIM) + sparse, computed by hand."""
    alpha, w_kl, beta_ssim, sparse = 2.0, 0.00025, 0.3, 1.0
    cfg = LossConfig(recon="mse", recon_weight=alpha, kl=KLConfig(weight=w_kl), ssim_weight=beta_ssim,
                     sparsity_weight=sparse)
    loss = VAELoss(cfg, TANH, 3)
    x, recon = images(h=32, w=32, seed=1), images(h=32, w=32, seed=2)
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g) * 0.5
    r = loss(output(recon, mu, logvar), x, step=123)
    kl = (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).flatten(1).sum(1).mean()
    ssim = _ssim_by_hand((recon + 1) / 2, (x + 1) / 2)
    by_hand = alpha * (recon - x).pow(2).mean() + w_kl * kl + beta_ssim * (1 - ssim) + sparse * mu.abs().mean()
    assert r.terms["ssim"].item() == pytest.approx(ssim.item(), abs=1e-5)
    assert r.total.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert set(r.terms) == {"recon", "kl", "kl_weighted", "beta", "ssim", "ssim_loss", "sparsity"}


def test_seed_000_total_l1_perceptual_tv_kl():
    """The flowers conv VAE: 5 * L1 + perceptual + 0.5 * TV + KL, with its KL weight in our units (2 / latent dims:
    its `(std^2 + mu^2 - log std - 1).mean()` has twice the KL's mu^2 and log-variance curvature,
    averaged over dims instead of summed), computed by hand from the backbone's raw features."""
    d = 64
    cfg = LossConfig(recon="l1", recon_weight=5.0, tv_weight=0.5, kl=KLConfig(weight=2.0 / d),
                     perceptual=PerceptualConfig(weight=1.0, backbone="test_resnet", layers=[1, 2, 3]))
    loss = VAELoss(cfg, TANH, 3)
    x, recon = images(h=32, w=32, seed=1), images(h=32, w=32, seed=2)
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(2, d, generator=g), torch.randn(2, d, generator=g) * 0.3
    r = loss(output(recon, mu, logvar), x, step=0)

    backbone, mean, std = loss.perceptual.backbone, loss.perceptual._mean, loss.perceptual._std
    with torch.no_grad():
        fa = backbone(((recon + 1) / 2 - mean) / std)
        fb = backbone(((x + 1) / 2 - mean) / std)
    perc = sum((a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)).abs().sum(1).mean()
               / math.sqrt(a.shape[1]) for a, b in zip(fa, fb))
    tv = ((recon[:, :, 1:] - recon[:, :, :-1]).abs().sum((2, 3)) + (recon[..., 1:] - recon[..., :-1]).abs()
          .sum((2, 3))).mean() / (32 * 32)
    kl = (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).sum(1).mean()
    by_hand = 5 * (recon - x).abs().mean() + perc + 0.5 * tv + (2.0 / d) * kl
    assert r.terms["perceptual"].item() == pytest.approx(perc.item(), rel=1e-5)
    assert r.total.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # The weight means what the original meant near the prior: the same coefficient on mu^2 ...
    seed_kl = lambda m, lv: (lv.mul(0.5).exp() ** 2 + m ** 2 - lv.mul(0.5) - 1).mean()  # noqa: E731
    m = torch.full((1, d), 0.3)
    zero = torch.zeros(1, d)
    ours = lambda m, lv: (2.0 / d) * kl_per_dim(m, lv).sum()  # noqa: E731
    assert (seed_kl(m, zero) - seed_kl(zero, zero)).item() == pytest.approx(ours(m, zero).item(), rel=1e-5)
    # ... and the same curvature in the log-variance at the prior (finite differences).
    h = 1e-2
    curv = lambda f: (f(zero, zero + h) - 2 * f(zero, zero) + f(zero, zero - h)) / h ** 2  # noqa: E731
    assert curv(seed_kl).item() == pytest.approx(curv(ours).item(), rel=1e-3)


def test_terms_are_detached_total_has_grad_and_forward_never_syncs(monkeypatch):
    cfg = LossConfig(recon="gaussian", ssim_weight=1.0, tv_weight=1.0, sparsity_weight=1.0,
                     kl=KLConfig(free_bits_nats=0.1, schedule="cyclical", cycle_steps=10),
                     perceptual=PerceptualConfig(weight=1.0, backbone="test_resnet", layers=[1]))
    loss = VAELoss(cfg, TANH, 3)
    x = images(h=32, w=32)
    recon = images(h=32, w=32, seed=5).requires_grad_()
    mu = torch.randn(2, 8, requires_grad=True)

    def no_sync(*a, **k):
        raise AssertionError("forward waited for the device")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    r = loss(output(recon, mu), x, step=3)
    monkeypatch.undo()
    assert set(r.terms) == {"recon", "kl", "kl_weighted", "beta", "perceptual", "ssim", "ssim_loss", "tv", "sparsity"}
    assert all(not t.requires_grad and t.dim() == 0 and t.dtype == torch.float32 for t in r.terms.values())
    assert r.total.requires_grad and r.kl_per_dim.shape == (8,) and not r.kl_per_dim.requires_grad
    r.total.backward()
    assert recon.grad is not None and mu.grad is not None


def test_bf16_autocast_gives_the_float32_total():
    cfg = LossConfig(ssim_weight=1.0, tv_weight=0.5)
    loss = VAELoss(cfg, TANH, 3)
    x, recon = images(h=32, w=32, seed=1), images(h=32, w=32, seed=2)
    ref = loss(output(recon, torch.ones(2, 4)), x, 0).total
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(output(recon.bfloat16(), torch.ones(2, 4)), x, 0).total
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-2)  # only the bf16 rounding of recon differs


# ------------------------------------------------------------------------------------------------
# Likelihoods for evaluation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [discretized_gaussian_log_prob, discretized_laplace_log_prob])
@pytest.mark.parametrize("mean,scale", [(0.0, 0.1), (0.3, 0.01), (-0.95, 0.5), (1.4, 0.05), (0.2, 1e-4),
                                        (0.0, 20.0)])
@pytest.mark.parametrize("data_range", [TANH, SIGMOID])
def test_discretised_bins_sum_to_one(fn, mean, scale, data_range):
    lo, hi = data_range
    values = lo + torch.arange(256, dtype=torch.float32) * (hi - lo) / 255
    m = torch.full_like(values, lo + (mean + 1) / 2 * (hi - lo))
    lp = fn(values, m, math.log(scale * (hi - lo) / 2), data_range)
    assert torch.isfinite(lp).all() or scale < 1e-3  # far bins of a tiny scale may be -inf: probability 0
    assert torch.exp(lp.double()).sum().item() == pytest.approx(1.0, abs=1e-4)


def test_discretised_gaussian_bin_equals_the_cdf_difference():
    sigma, mean = 0.2, 0.1
    phi = lambda v: 0.5 * (1 + math.erf((v - mean) / (sigma * math.sqrt(2))))  # noqa: E731
    w = 2 / 255
    for k in (0, 1, 100, 140, 254, 255):
        x = -1 + k * w
        lo = 0.0 if k == 0 else phi(x - w / 2)
        hi = 1.0 if k == 255 else phi(x + w / 2)
        got = discretized_gaussian_log_prob(torch.tensor([x]), torch.tensor([mean]), math.log(sigma), TANH)
        assert got.item() == pytest.approx(math.log(hi - lo), rel=1e-4, abs=1e-5), k


def test_log_normal_helpers_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    z, mu, logvar = (torch.randn(5, 3, 2, 2, generator=g) for _ in range(3))
    ref = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).flatten(1).sum(1)
    assert torch.allclose(log_normal_diag(z, mu, logvar), ref, atol=1e-5)
    ref0 = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    assert torch.allclose(log_standard_normal(z), ref0, atol=1e-5)


def test_iwae_bound_and_bits_per_dim():
    log_w = torch.tensor([[-10.0, -3.0], [-12.0, -3.0], [-11.0, -3.0]])  # K = 3, B = 2
    expected0 = math.log((math.exp(-10) + math.exp(-12) + math.exp(-11)) / 3)
    bound = iwae_bound(log_w)
    assert bound[0].item() == pytest.approx(expected0) and bound[1].item() == pytest.approx(-3.0)
    assert bound[0].item() >= log_w[:, 0].mean().item()  # Jensen: IWAE >= the ELBO estimate
    # A uniform distribution over 256 values costs exactly 8 bits per sub-pixel.
    assert bits_per_dim(3 * 64 * 64 * math.log(256), 3 * 64 * 64) == pytest.approx(8.0)


def test_log_px_z_neg_elbo_and_iwae_weights_per_likelihood():
    x = torch.round(images(b=2, h=8, w=8, rng=SIGMOID, seed=1) * 255) / 255
    recon = images(b=6, h=8, w=8, rng=SIGMOID, seed=2).clamp(0.02, 0.98)  # L = 3 samples
    g = torch.Generator().manual_seed(4)
    mu, logvar = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g) * 0.3
    z = mu.repeat(3, 1) + torch.exp(0.5 * logvar).repeat(3, 1) * torch.randn(6, 5, generator=g)
    out = output(recon, mu, logvar, z)
    t = x.repeat(3, 1, 1, 1)

    bce = VAELoss(LossConfig(recon="bce"), SIGMOID, 3)
    lp = bce.log_px_z(recon, x)
    assert torch.allclose(lp, -F.binary_cross_entropy(recon, t, reduction="none").flatten(1).sum(1), rtol=1e-5)

    gauss = VAELoss(LossConfig(recon="gaussian", gaussian_logvar="channel"), SIGMOID, 3)
    with torch.no_grad():
        gauss.gaussian_logvar.copy_(torch.log(torch.tensor([0.01, 0.04, 0.09])))  # sigma 0.1, 0.2, 0.3
    lp = gauss.log_px_z(recon, x)
    sig = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1).expand_as(t)
    ref = discretized_gaussian_log_prob(t, recon, torch.log(sig), SIGMOID).flatten(1).sum(1)
    assert torch.allclose(lp, ref)
    nelbo = gauss.neg_elbo(out, x)
    assert torch.allclose(nelbo, -lp.view(3, 2).mean(0) + kl_per_dim(mu, logvar).sum(1), rtol=1e-6)
    log_w = gauss.iwae_log_weights(out, x)
    manual = lp + log_standard_normal(z) - log_normal_diag(z, mu.repeat(3, 1), logvar.repeat(3, 1))
    assert log_w.shape == (3, 2) and torch.allclose(log_w.flatten(), manual)

    for kind, fn in (("l1", discretized_laplace_log_prob), ("mse", discretized_gaussian_log_prob)):
        loss = VAELoss(LossConfig(recon=kind), SIGMOID, 3)
        with pytest.raises(ValueError, match="needs log_scale"):
            loss.log_px_z(recon, x)
        term = loss(out, x, 0).terms["recon"]
        s = fixed_log_scale(kind, term)
        want = math.log(term.item()) if kind == "l1" else 0.5 * math.log(term.item())
        assert s == pytest.approx(want)
        assert torch.allclose(loss.log_px_z(recon, x, s), fn(t, recon, s, SIGMOID).flatten(1).sum(1))


def test_bernoulli_log_prob_convention():
    x = torch.tensor([0.0, 1.0, 0.25])
    p = torch.tensor([0.2, 0.9, 0.5])
    want = torch.tensor([math.log(0.8), math.log(0.9), 0.25 * math.log(0.5) + 0.75 * math.log(0.5)])
    assert torch.allclose(bernoulli_log_prob(x, p), want)


def test_unknown_recon_kind_and_negative_weights_are_config_errors():
    with pytest.raises(ConfigError, match="loss.recon"):
        VAELoss(LossConfig(recon="huber"), TANH, 3)
    with pytest.raises(ConfigError, match="loss.tv_weight"):
        VAELoss(dataclasses.replace(LossConfig(), tv_weight=-1.0), TANH, 3)
    with pytest.raises(ConfigError, match="loss.ssim_window"):
        VAELoss(LossConfig(ssim_weight=1.0, ssim_window=4), TANH, 3)


@pytest.mark.parametrize("shape, window", [((2, 3, 32, 32), 11), ((2, 3, 20, 24), 7), ((1, 1, 13, 13), 11)])
def test_ssim_is_kornias_map_from_a_window_built_once(shape, window):
    """Our SSIM (one separable blur of the five moments, the window cached per device) gives kornia's map,
    in either memory format and under bf16 autocast (computed in float32 like kornia's); 3-D likewise."""
    import kornia

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    expected = kornia.metrics.ssim(a, b, window)
    assert torch.allclose(ssim(a, b, window), expected, atol=1e-6, rtol=0)
    assert torch.allclose(ssim(a.contiguous(memory_format=torch.channels_last), b, window), expected, atol=1e-6, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssim(a, b, window)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-6, rtol=0)
    vol_a, vol_b = torch.rand(2, 1, 8, 8, 8, generator=g), torch.rand(2, 1, 8, 8, 8, generator=g)
    assert torch.allclose(ssim(vol_a, vol_b, 5), kornia.metrics.ssim3d(vol_a, vol_b, 5), atol=1e-5, rtol=0)
    assert ssim(a, a, window).min() > 0.9999  # an image with itself


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_under_bf16_never_synchronises():
    cfg = LossConfig(recon="gaussian", ssim_weight=1.0, tv_weight=1.0, sparsity_weight=1.0,
                     kl=KLConfig(free_bits_nats=0.1, schedule="linear", warmup_steps=10),
                     perceptual=PerceptualConfig(weight=1.0, backbone="test_resnet", layers=[1, 2]))
    loss = VAELoss(cfg, TANH, 3).to("cuda")
    assert next(loss.perceptual.backbone.parameters()).is_cuda
    x = images(h=32, w=32).cuda()
    recon = images(h=32, w=32, seed=5).cuda().requires_grad_()
    mu = torch.randn(2, 8, device="cuda", requires_grad=True)
    out = output(recon, mu, z=torch.zeros(2, 8, device="cuda"))
    loss(out, x, step=1)  # warm-up: kernels, cuDNN plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            r = loss(out, x, step=2)
        r.total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(r.total).item() and recon.grad is not None
