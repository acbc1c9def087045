"""FLOPs of a training step and model FLOPs utilisation (MFU): train.py's train/mfu and summary.json and
make bench-gpu's MFU column all come from here.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (2 per multiply-add of convolutions, matmuls
and attention; norms, activations and elementwise work are not counted), by running each network of the step
once on a weightless copy on the meta device: exact for the shapes trained, the same on any device, and free
of side effects (no weights, gradients, statistics or RNG touched). Per training image:

- vae: the VAE's forward and backward (pipeline.models.training_flops_per_image; the decoder
  samples_per_input times);
- perceptual: the frozen backbone on the target (no gradient) and on each reconstruction, and the
  backward to the reconstruction's pixels;
- discriminator: the generator step's forward on each reconstruction and backward to its pixels, and the
  discriminator's own step: forward on reals and reconstructions, backward to its weights (through every
  layer but the first; to the reals' pixels too with R1). The adaptive weight's two gradients of the
  decoder's last layer are not counted.

MFU = counted FLOPs x images/s per device / the device's dense bf16 peak (also for fp32 rows, which then
show what fp32 leaves unused). Devices not in PEAK_BF16_FLOPS report no MFU rather than a guess.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models import SDPA_CPU_FLOPS, training_flops_per_image

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}
"""Dense bf16 tensor-core peaks (FLOP/s) by a substring of torch.cuda.get_device_name()."""


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def step_flops_per_image(vae, loss, disc, image_size: int, r1: bool = False) -> dict[str, int]:
    """{"vae", "perceptual", "discriminator", "total"}: the FLOPs per training image of each network the
    step runs (0 for one that is off). `loss` is the VAELoss (its perceptual distance, if any), `disc` the
    bare discriminator or None."""
    channels, reps = vae.in_channels, getattr(vae, "samples_per_input", 1)
    shape = (1, channels, *[image_size] * vae.spatial_dims)
    counts = {"vae": training_flops_per_image(vae, image_size), "perceptual": 0, "discriminator": 0}
    perceptual = getattr(loss, "perceptual", None)
    if perceptual is not None:
        backbone = _meta_copy(perceptual.backbone, requires_grad=False)  # frozen: no weight gradients
        target = torch.zeros(shape, device="meta").expand(-1, 3, -1, -1)
        pixels = torch.zeros((reps, 3, *shape[2:]), device="meta", requires_grad=True)
        with FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
            with torch.no_grad():
                backbone(target)
            feats = backbone(pixels * 1)  # (a non-leaf input: the counter's module hooks refuse leaves in grad())
            torch.autograd.grad(sum(f.float().sum() for f in feats), pixels)
        counts["perceptual"] = int(counter.get_total_flops())
    if disc is not None:
        critic = _meta_copy(disc, requires_grad=True).train()
        params = [p for p in critic.parameters()]
        fake = torch.zeros((reps, *shape[1:]), device="meta", requires_grad=True)
        real = torch.zeros((reps, *shape[1:]), device="meta", requires_grad=r1)
        with FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
            torch.autograd.grad(critic(fake * 1).float().sum(), fake)  # the generator's adversarial term
            logits = critic(torch.cat([real, fake.detach()]))  # the discriminator's step
            torch.autograd.grad(logits.float().sum(), params + ([real] if r1 else []))
        counts["discriminator"] = int(counter.get_total_flops())
    counts["total"] = sum(counts.values())
    return counts


def _meta_copy(module: torch.nn.Module, requires_grad: bool) -> torch.nn.Module:
    """A copy of `module` whose parameters and buffers are weightless meta tensors."""
    memo: dict[int, object] = {id(t): torch.empty_like(t, device="meta") for t in module.buffers()}
    memo.update({id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=requires_grad)
                 for p in module.parameters()})
    return copy.deepcopy(module, memo)
