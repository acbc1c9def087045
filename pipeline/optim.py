"""Optimizer, learning-rate schedule and the EMA copy of the weights."""

from __future__ import annotations

import copy
import math

import torch

from pipeline.config import OptimConfig


def build_optimizer(model_params, no_decay_params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam/AdamW, fused: the fused kernels honour `optimizer.found_inf`, which lets the trainer skip a
    non-finite step on the device without a host sync (the same path the fp16 GradScaler uses).
    `no_decay_params` (the loss's learned log-variance) get no weight decay, which would pull sigma to 1."""
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    groups = [{"params": list(model_params)}, {"params": list(no_decay_params), "weight_decay": 0.0}]
    return cls([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
               weight_decay=cfg.weight_decay, fused=True)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based). A pure function of the step, so there is
    no scheduler state to checkpoint and a resumed run continues the exact same curve."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if cfg.schedule == "exponential":
        return cfg.lr * cfg.gamma ** ((step - cfg.warmup_steps) // cfg.gamma_every_steps)
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA(torch.nn.Module):
    """An exponential moving average of the weights and floating-point buffers (BatchNorm statistics),
    updated after every optimizer step; `.module` is what media and evaluation use. The update is one
    fused foreach-lerp with no host sync (torch's AveragedModel checks a device counter every update)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """Warm-up (as timm's ModelEmaV3): early on the average follows the model closely, so media and
        validation of short runs do not show the initial weights; after ~10/(1-decay) steps it is `decay`."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, ok: torch.Tensor | None = None) -> None:
        """Move the average toward `model`. `ok` (a 0-dim bool tensor on the device) False leaves the
        average exactly as it was — a skipped non-finite step must not move it — without a host sync.
        Integer buffers (BatchNorm's num_batches_tracked) are counters, copied rather than averaged: a
        skipped step has already put the model's back (train_step), so copying them is right either way."""
        ema, current, ints, int_current = [], [], [], []
        for (name, e), c in zip(self.module.state_dict().items(), model.state_dict().values()):
            if e.is_floating_point():
                ema.append(e)
                current.append(c.detach())
            else:
                ints.append(e)
                int_current.append(c)
        if ints:
            torch._foreach_copy_(ints, int_current)
        weight = 1.0 - self.decay_at(step)
        if ok is None:
            torch._foreach_lerp_(ema, current, weight)
            return
        # e += w * (c - e) with w a device tensor, 0 on a skipped step: the weights and buffers it left are
        # finite, so e + 0 * (c - e) = e exactly. (_foreach_lerp_ takes a 0-dim tensor weight as a Python
        # number: an .item(), a host sync in every step.) Three fused foreach kernels.
        delta = torch._foreach_sub(current, ema)
        torch._foreach_mul_(delta, ok.to(ema[0].dtype) * weight)
        torch._foreach_add_(ema, delta)
