"""Every shipped recipe loads, builds its real model and loss, and trains one step on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.objective import VAELoss
from pipeline.models import build_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# The image size each recipe is written for (its shards' SIZE); resnet_f8 runs at 32 px here to keep an
# 83.7M-parameter forward/backward cheap on CPU — the architecture is size-agnostic (f = 8).
SIZES = {"flowers": 128, "flowers_gan": 128, "dogs64": 64, "vanilla64": 64, "resnet_f8": 32, "demo": 64,
         "vq_f8": 64, "signals1d": 256, "volumes3d": 16, "ldm_f8_diffusable": 32}  # (the last two: signal length and volume side)


def test_all_recipes_are_covered():
    assert {p.stem for p in RECIPES} == set(SIZES)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_builds_and_trains_one_step(recipe):
    # The perceptual backbone is built with random weights: no network here (README: Loss).
    cfg = load_config(recipe, ["loss.perceptual.weights=none", "loss.vf.weights=none"], check_paths=False)
    torch.manual_seed(0)
    size = SIZES[recipe.stem]
    model = build_model(cfg.model, size)
    loss_fn = VAELoss(cfg.loss, model.output_range, cfg.model.in_channels, cfg.model.spatial_dims, model.latent_shape)
    low, high = model.output_range
    x = torch.rand(2, cfg.model.in_channels, *[size] * cfg.model.spatial_dims) * (high - low) + low
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16"):
        out = model(x)
        result = loss_fn(out, x, step=cfg.train.max_steps // 2, vae=model)  # (the model: latent regularisers)
        total = result.total
        if cfg.loss.adversarial.weight > 0:  # the generator's adversarial term, as pipeline.step adds it
            from pipeline.objective.adversarial import (adaptive_weight, build_discriminator, decoder_last_layer,
                                                        generator_loss)

            disc = build_discriminator(cfg.loss.adversarial, cfg.model.in_channels, size).requires_grad_(False)
            gan = generator_loss(cfg.loss.adversarial.loss, disc(out.recon))
            w = adaptive_weight(result.total, gan, decoder_last_layer(model), cfg.loss.adversarial.adaptive_weight_max)
            assert torch.isfinite(w) and w > 0
            total = total + cfg.loss.adversarial.weight * w * gan
    total.backward()
    assert torch.isfinite(total)
    quantized = cfg.model.quantizer.kind != "none"  # the quantizer's loss replaces the KL term
    assert ({"recon", "quantizer"} if quantized else {"recon", "kl", "kl_weighted", "beta"}) <= set(result.terms)
    if cfg.loss.perceptual.weight:
        assert "perceptual" in result.terms
    if cfg.loss.ssim_weight:
        assert "ssim" in result.terms
    for key in ("vf", "equivariance", "latent_noise"):
        if getattr(cfg.loss, key).weight:
            assert key in result.terms
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
