"""FLOPs per training image for MFU (pipeline/flops.py), against known answers in units of one forward pass
of each network, and the peak table's lookup."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import load_config
from pipeline.flops import peak_flops, step_flops_per_image
from pipeline.models import build_model, training_flops_per_image
from pipeline.objective import VAELoss
from pipeline.objective.adversarial import build_discriminator


def _forward_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return int(counter.get_total_flops())


def test_each_network_of_the_step_is_counted_in_forward_passes():
    cfg = load_config("recipes/flowers_gan.yaml", [
        "model.channels=[8,16]", "model.latent_dim=8", "loss.perceptual.weights=none",
        "loss.perceptual.backbone=test_resnet", "loss.adversarial.disc_channels=8", "loss.adversarial.disc_layers=2"],
        check_paths=False)
    vae = build_model(cfg.model, 32)
    loss = VAELoss(cfg.loss, vae.output_range, 3)
    disc = build_discriminator(cfg.loss.adversarial, 3, 32)
    x = torch.zeros(1, 3, 32, 32)
    backbone, critic = _forward_flops(loss.perceptual.backbone, x), _forward_flops(disc.eval(), x)
    first = _forward_flops(disc.main[0], x)  # the first convolution, whose input gradient only R1 needs
    before = [p.clone() for p in disc.parameters()]

    counts = step_flops_per_image(vae, loss, disc, 32)
    assert counts["vae"] == training_flops_per_image(vae, 32)
    # target and reconstruction forward, the reconstruction's input gradient (no weight gradients: frozen)
    assert counts["perceptual"] == 3 * backbone > 0
    # generator term: forward + input gradient (2 passes); its own step on real + fake (2 images): forward,
    # weight gradients, and input gradients of every layer but the first (2 x 3 passes - 2 first convolutions)
    assert counts["discriminator"] == 8 * critic - 2 * first > 0
    assert step_flops_per_image(vae, loss, disc, 32, r1=True)["discriminator"] == 8 * critic  # R1: the reals' pixels
    assert counts["total"] == counts["vae"] + counts["perceptual"] + counts["discriminator"]
    assert all(torch.equal(a, b) for a, b in zip(before, disc.parameters()))  # counted on meta copies

    plain = step_flops_per_image(vae, VAELoss(load_config("recipes/demo.yaml", check_paths=False).loss,
                                              vae.output_range, 3), None, 32)
    assert plain["perceptual"] == plain["discriminator"] == 0 and plain["total"] == plain["vae"]


def test_mfu_has_no_peak_on_cpu():
    assert peak_flops(torch.device("cpu")) is None
