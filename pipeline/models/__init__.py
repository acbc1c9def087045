"""The model zoo: one builder for the recipe's `model:` section.

    model = build_model(cfg.model, image_size=manifest["size"])   # ConfigError if the shapes do not fit
    out = model(images)                                             # VAEOutput(recon, mu, logvar, z)
    flops = training_flops_per_image(model, image_size)            # for MFU

Architectures: conv (the flowers conv VAE), dcgan (the DCGAN dog VAE), vanilla (AntixK's VanillaVAE),
resnet (LDM-style).
"""

from __future__ import annotations

import dataclasses

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

from pipeline.config import ConfigError, ModelConfig
from pipeline.models.base import OUTPUT_RANGES, VAE, VAEOutput
from pipeline.models.conv import ConvVAE
from pipeline.models.dcgan import DCGANVAE
from pipeline.models.resnet import ResNetVAE
from pipeline.models.vanilla import VanillaVAE

ARCHS: dict[str, type[VAE]] = {"conv": ConvVAE, "dcgan": DCGANVAE, "vanilla": VanillaVAE, "resnet": ResNetVAE}

__all__ = ["ARCHS", "OUTPUT_RANGES", "VAE", "VAEOutput", "ConvVAE", "DCGANVAE", "VanillaVAE", "ResNetVAE",
           "build_model", "training_flops_per_image"]


def build_model(cfg: ModelConfig, image_size: int) -> VAE:
    """The VAE the recipe describes, for square images of image_size px (the shards' size).

    Every shape is checked here, before any data is read: a config that does not fit raises
    ConfigError with one sentence naming the key, level or list index.
    """
    if cfg.arch not in ARCHS:
        raise ConfigError(f"model.arch is {cfg.arch!r} but must be one of {', '.join(ARCHS)}")
    if cfg.latent == "auto":  # each architecture's own latent: dcgan's and LDM's resnet are spatial
        cfg = dataclasses.replace(cfg, latent="spatial" if cfg.arch in ("dcgan", "resnet") else "vector")
    return ARCHS[cfg.arch](cfg, image_size)


# CPU's fused attention kernel is missing from FlopCounterMode's table (CUDA's are there); without
# this, attention matmuls that run through it would silently drop out of the count.
SDPA_CPU_FLOPS = {  # FlopCounterMode counts the CUDA SDPA kernels; the CPU one by the same formulas
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop,
}


def training_flops_per_image(model: VAE, image_size: int) -> int:
    """FLOPs (2 per multiply-add) of one training step's forward + backward for a 1-image batch.

    Counts what torch.utils.flop_counter.FlopCounterMode counts: convolutions, matmuls and attention
    (norms and activations are not counted); the decoder runs samples_per_input times, as in training.
    Runs on a weightless copy of the model on the meta device: it takes well under a second for an
    83M-parameter model, gives the same count on any device, and leaves the model, its gradients,
    BatchNorm statistics and the RNG untouched. Pass the bare model (not a DDP/compiled wrapper).
    """
    # Pre-seed deepcopy's memo with meta tensors so no weights are copied.
    memo: dict[int, object] = {id(t): torch.empty_like(t, device="meta") for t in model.buffers()}
    memo.update({id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                 for p in model.parameters()})
    meta = copy.deepcopy(model, memo).eval()  # eval: a 1-image batch is fine for BatchNorm
    x = torch.zeros(1, meta.in_channels, *[image_size] * meta.spatial_dims, device="meta")  # one sample's shape
    params = [p for p in meta.parameters() if p.requires_grad]
    with FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
        out = meta(x)
        loss = out.recon.float().mean() + out.mu.float().square().mean()
        loss = loss + (out.logvar.float().mean() if out.logvar is not None else 0)
        loss = loss + (out.quant_loss if out.quant_loss is not None else 0)
        torch.autograd.grad(loss, params, allow_unused=True)
    return int(counter.get_total_flops())
