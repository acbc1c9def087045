"""The training step, shared by train.py, pipeline.batchsize and benchmarks/bench_train.py so the three
always build and measure the same thing.

    t = build_training(cfg, accelerator, image_size)   # model, loss, augmentation, EMA, optimizer, prepared
    result = train_step(t, accelerator, micro_batches, step, cfg)   # StepResult, all on the device
    t.ema.update(t.vae, step, result.ok)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from pipeline.checkpoint import Parts
from pipeline.config import Config
from pipeline.data import DeviceAugment
from pipeline.objective import VAELoss
from pipeline.models import build_model
from pipeline.optim import EMA, build_optimizer


class TrainModule(torch.nn.Module):
    """The VAE and its loss as one module, so DDP also averages the loss's own parameters (the learned
    log-variance of the gaussian likelihood) and one forward returns everything the step needs."""

    def __init__(self, vae: torch.nn.Module, loss: VAELoss):
        super().__init__()
        self.vae, self.loss = vae, loss

    def forward(self, images: torch.Tensor, step: int):
        out = self.vae(images)
        return self.loss(out, images, step)


@dataclass
class Training:
    """Everything a training step needs. Built by build_training for train.py, pipeline.batchsize and
    benchmarks/bench_train.py alike, so the three always measure the same step."""

    vae: torch.nn.Module  # the bare model (not DDP, not compiled)
    loss: VAELoss
    augment: DeviceAugment
    ema: EMA | None
    module: torch.nn.Module  # TrainModule(vae, loss), prepared (DDP on several processes)
    optimizer: torch.optim.Optimizer
    memory_format: torch.memory_format

    @property
    def parts(self) -> Parts:
        return Parts(self.vae, self.loss, self.optimizer, self.ema)


@dataclass
class StepResult:
    terms: dict[str, torch.Tensor]  # each loss term (and "total"), mean over the step's micro-batches
    grad_norm: torch.Tensor
    nonfinite: dict[str, torch.Tensor]  # per term and "grad_norm": 1.0 if non-finite on any rank
    ok: torch.Tensor  # nothing non-finite: the update was applied


def train_step(t: Training, accelerator, micro_batches, step: int, cfg: Config) -> StepResult:
    """One optimizer step over `grad_accum_steps` micro-batches; every result stays on the device.

    A step with a non-finite loss term (on any rank) or gradient changes nothing: the fused optimizer
    skips the update through found_inf (the GradScaler's path), BatchNorm statistics are put back,
    and the caller's EMA update is given `ok`. The flags are all-reduced (MAX) in one small
    collective, so every rank takes the same decision without a host sync."""
    buffers = [b for b in t.vae.buffers()]  # BatchNorm running statistics move in every forward
    saved = [b.clone() for b in buffers]
    sums: dict[str, torch.Tensor] = {}
    for images in micro_batches:
        with accelerator.accumulate(t.module):
            result = t.module(images, step)
            accelerator.backward(result.total)
        for name, value in {**result.terms, "total": result.total}.items():
            sums[name] = sums[name] + value.detach().float() if name in sums else value.detach().float()
    terms = {name: value / len(micro_batches) for name, value in sums.items()}
    clip = cfg.optim.grad_clip_norm or float("inf")  # inf: measure the norm, change nothing
    grad_norm = accelerator.clip_grad_norm_(t.module.parameters(), clip)  # identical on every rank
    names = [*terms, "grad_norm"]
    flags = (~torch.isfinite(torch.stack([*terms.values(), grad_norm.float()]))).float()
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "sum").clamp(max=1.0)
    ok = flags.sum() == 0
    _skip_unless(ok, t.optimizer, accelerator)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    for b, before in zip(buffers, saved):
        b.copy_(torch.where(ok, b, before))
    return StepResult(terms, grad_norm, dict(zip(names, flags.unbind())), ok)


def _skip_unless(ok: torch.Tensor, optimizer, accelerator) -> None:
    """Make the optimizer step a no-op (moments, step counts and weights untouched) unless `ok`."""
    inner = optimizer.optimizer  # the torch optimizer inside Accelerate's wrapper
    if accelerator.scaler is None:
        inner.found_inf = (~ok).float()
    else:  # fp16: the GradScaler skips what it found non-finite when unscaling; add the loss flags
        for found in accelerator.scaler._per_optimizer_states[id(inner)]["found_inf_per_device"].values():
            torch.maximum(found, (~ok).float().to(found.device), out=found)


def build_training(cfg: Config, accelerator: Accelerator, image_size: int) -> Training:
    vae = build_model(cfg.model, image_size)
    loss_fn = VAELoss(cfg.loss, vae.output_range, cfg.model.in_channels)
    augment = DeviceAugment(cfg.data, vae.output_range).to(accelerator.device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    vae = vae.to(accelerator.device, memory_format=memory_format)
    ema = EMA(vae, cfg.optim.ema_decay).to(accelerator.device) if cfg.optim.ema_decay > 0 else None
    module = TrainModule(torch.compile(vae) if cfg.train.compile else vae, loss_fn)
    # The loss's own parameters (the gaussian log-variance) get no weight decay.
    optimizer = build_optimizer(vae.parameters(), [p for p in loss_fn.parameters() if p.requires_grad], cfg.optim)
    module, optimizer = accelerator.prepare(module, optimizer)
    return Training(vae, loss_fn, augment, ema, module, optimizer, memory_format)
