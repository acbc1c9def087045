"""The training step, shared by train.py, pipeline.batchsize and benchmarks/bench_train.py so the three
always build and measure the same thing.

    t = build_training(cfg, accelerator, image_size)   # model, loss, augmentation, EMA, optimizer(s), prepared
    result = train_step(t, accelerator, micro_batches, step, cfg)     # the VAE (generator) step
    t.ema.update(t.vae, step, result.ok)
    if t.adversary is not None and t.adversary.schedule.disc_active(step):
        d = discriminator_step(t.adversary, accelerator, micro_batches, result.fakes, step)   # its own optimizer

Two optimizers, two steps, each over the same micro-batches with its own `accelerator.accumulate`:
the generator step reads the discriminator only through `Adversary.generator_term` (D's parameters are
frozen there and it is called without DDP, so no gradient reaches them and the generator's backward
all-reduces the generator's gradients only); the discriminator step sees the reconstructions detached,
so the generator's graph is not part of its backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from pipeline.checkpoint import Parts
from pipeline.config import AdversarialConfig, Config, ConfigError, TrainConfig
from pipeline.data import DeviceAugment
from pipeline.import_diffusers import load_init
from pipeline.models import build_model
from pipeline.models.quantize import Quantizer, keep_eager, quantizers
from pipeline.objective import VAELoss
from pipeline.objective.latent import encoder_last_layer
from pipeline.objective.adversarial import (AdversarialSchedule, LeCamEMA, adaptive_weight, build_discriminator,
                                            decoder_last_layer, discriminator_loss, generator_loss, lecam_penalty,
                                            r1_penalty)
from pipeline.optim import EMA, build_optimizer, lr_at, set_lr


class TrainModule(torch.nn.Module):
    """The VAE and its loss as one module, so DDP also averages the loss's own parameters (the learned
    log-variance of the gaussian likelihood) and one forward returns everything the step needs."""

    def __init__(self, vae: torch.nn.Module, loss: VAELoss):
        super().__init__()
        self.vae, self.loss = vae, loss

    def forward(self, images: torch.Tensor, step: int):
        out = self.vae(images)
        return out.recon, self.loss(out, images, step, self.vae)  # (the vae: the latent regularisers decode again)


class DiscriminatorModule(torch.nn.Module):
    """The discriminator on real and (detached) fake images in one forward: (logits_real, logits_fake)."""

    def __init__(self, critic: torch.nn.Module):
        super().__init__()
        self.critic = critic

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        logits = self.critic(torch.cat([real, fake]))
        return logits[: real.shape[0]], logits[real.shape[0]:]


@dataclass
class Adversary:
    """The discriminator side of the adversarial stage, built by build_training when loss.adversarial.weight > 0."""

    cfg: AdversarialConfig
    schedule: AdversarialSchedule
    disc: torch.nn.Module  # the bare NLayerDiscriminator (not DDP, not compiled): checkpoints, media
    critic: torch.nn.Module  # disc, compiled when train.compile: the generator step calls it without DDP
    module: torch.nn.Module  # DiscriminatorModule(critic), prepared (DDP on several processes)
    optimizer: torch.optim.Optimizer
    lecam: LeCamEMA
    last_layer: torch.nn.Parameter  # the decoder's last layer, where the adaptive weight is measured

    def generator_term(self, accelerator, recon: torch.Tensor, rec_total: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator's adversarial term for reconstructions `recon` (with their graph) and the terms to
        log. D's parameters are frozen (no gradient reaches them) and D runs outside DDP."""
        self.disc.requires_grad_(False)
        with accelerator.autocast():
            logits = self.critic(recon)
        with torch.autocast(recon.device.type, enabled=False):
            g = generator_loss(self.cfg.loss, logits)
            if self.cfg.adaptive_weight:
                scaler = accelerator.scaler  # fp16: measure scaled gradients, which do not underflow
                w = adaptive_weight(rec_total, g, self.last_layer, self.cfg.adaptive_weight_max,
                                    loss_scale=getattr(scaler, "_scale", None) if scaler is not None else None)
            else:
                w = torch.ones((), device=recon.device)
            term = self.cfg.weight * w * g
        return term, {"gan_g": g.detach(), "gan_adaptive_weight": w, "gan_g_weighted": term.detach()}


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
    buffers: "FlatBuffers"
    adversary: Adversary | None = None
    quantizers: list[Quantizer] = field(default_factory=list)  # of the bare VAE; updated after each step

    @property
    def parts(self) -> Parts:
        a = self.adversary
        return Parts(self.vae, self.loss, self.optimizer, self.ema, disc=a.disc if a else None,
                     disc_state=a.lecam if a else None, disc_optimizer=a.optimizer if a else None)


class FlatBuffers:
    """A module's buffers (BatchNorm running statistics and counters, codebook statistics) re-homed as views
    of one flat tensor per dtype, so that train_step saves them before a step and puts them back after a
    skipped one in three kernels per dtype, whatever the number of layers (a copy, a where and a copy per
    buffer made the flowers model's step 1.6x a bare loop's kernel launches).

    The buffers stay ordinary buffers: forwards, DDP's broadcast, load_state_dict and torch.compile all
    write them in place, which writes the flat tensor. Whatever replaces a buffer object afterwards (a
    `module.to(...)`, assigning a new tensor) would fall out of the flat tensor: build this last."""

    def __init__(self, module: torch.nn.Module):
        groups: dict[torch.dtype, list[tuple[torch.nn.Module, str, torch.Tensor]]] = {}
        for owner in module.modules():
            for name, buf in owner._buffers.items():
                if buf is not None:
                    groups.setdefault(buf.dtype, []).append((owner, name, buf))
        self.flat: list[torch.Tensor] = []
        with torch.no_grad():
            for items in groups.values():
                flat = torch.cat([buf.reshape(-1) for _, _, buf in items])
                offset = 0
                for owner, name, buf in items:
                    owner._buffers[name] = flat[offset:offset + buf.numel()].view(buf.shape)
                    offset += buf.numel()
                self.flat.append(flat)
        self.saved = [f.clone() for f in self.flat]

    def save(self) -> None:
        for saved, flat in zip(self.saved, self.flat):
            saved.copy_(flat)

    def restore_unless(self, ok: torch.Tensor) -> None:
        """Put back what save() saw unless `ok` (a 0-dim bool on the device): no host sync."""
        for saved, flat in zip(self.saved, self.flat):
            flat.copy_(torch.where(ok, flat, saved))


@dataclass
class StepResult:
    terms: dict[str, torch.Tensor]  # each loss term (and "total"), mean over the step's micro-batches
    grad_norm: torch.Tensor
    nonfinite: dict[str, torch.Tensor]  # per term and "grad_norm": 1.0 if non-finite on any rank
    ok: torch.Tensor  # nothing non-finite: the update was applied
    fakes: list[torch.Tensor] = field(default_factory=list)  # detached reconstructions per micro-batch


def train_step(t: Training, accelerator, micro_batches, step: int, cfg: Config) -> StepResult:
    """One optimizer step of the VAE over `grad_accum_steps` micro-batches; every result stays on the device.

    A step with a non-finite loss term (on any rank) or gradient changes nothing: the fused optimizer
    skips the update through found_inf (the GradScaler's path), BatchNorm statistics are put back,
    and the caller's EMA update is given `ok`. The flags are all-reduced (MAX) in one small
    collective, so every rank takes the same decision without a host sync."""
    if cfg.train.compile and cfg.train.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten now
    t.buffers.save()  # BatchNorm running statistics move in every forward: put back if the step is skipped
    adversary = t.adversary if t.adversary is not None and t.adversary.schedule.gen_active(step) else None
    keep_fakes = t.adversary is not None and t.adversary.schedule.disc_active(step)
    names, sums = None, None  # the terms' names and their values summed over micro-batches, as one vector
    fakes = []
    for images in micro_batches:
        with accelerator.accumulate(t.module):
            recon, result = t.module(images, step)
            total, terms = result.total, dict(result.terms)
            if adversary is not None:  # the discriminator's verdict, weighted adaptively
                gan, gan_terms = adversary.generator_term(accelerator, recon, result.total)
                total = total + gan
                terms.update(gan_terms)
            accelerator.backward(total)
        if keep_fakes:
            fakes.append(recon.detach())
        names, sums = _accumulate(names, sums, {**terms, "total": total})
    terms = _mean_terms(names, sums, len(micro_batches))
    clip = cfg.optim.grad_clip_norm or float("inf")  # inf: measure the norm, change nothing
    grad_norm = accelerator.clip_grad_norm_(t.module.parameters(), clip)  # identical on every rank
    ok, flags = _agree(terms, grad_norm, accelerator)
    _skip_unless(ok, t.optimizer, accelerator)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.buffers.restore_unless(ok)
    for q in t.quantizers:  # codebook statistics all-reduced over ranks, EMA codebooks, dead-code restarts
        q.after_step(step, ok)
    return StepResult(terms, grad_norm, flags, ok, fakes)


def discriminator_step(a: Adversary, accelerator, micro_batches, fakes, step: int) -> StepResult:
    """One optimizer step of the discriminator on the step's real micro-batches and the generator's
    detached reconstructions of them; non-finite handling as in train_step (its own flags and skip)."""
    a.disc.requires_grad_(True)
    set_lr(a.optimizer, lr_at(a.schedule.lr_step(step), a.schedule.optim_config(), a.schedule.lr_steps()))
    cfg = a.cfg
    names, sums = None, None
    for real, fake in zip(micro_batches, fakes):
        reps = fake.shape[0] // real.shape[0]  # several samples of z per input: as many reals
        real = real.repeat(reps, 1, 1, 1) if reps > 1 else real
        if cfg.r1_weight > 0:
            real = real.detach().requires_grad_(True)
        with accelerator.accumulate(a.module):
            logits_real, logits_fake = a.module(real, fake)
            with torch.autocast(real.device.type, enabled=False):
                loss = discriminator_loss(cfg.loss, logits_real, logits_fake)
                terms = {"gan_d": loss.detach(), "gan_logits_real": logits_real.detach().float().mean(),
                         "gan_logits_fake": logits_fake.detach().float().mean(),
                         "gan_disc_accuracy": 0.5 * ((logits_real.detach() > 0).float().mean()
                                                     + (logits_fake.detach() < 0).float().mean())}
                if cfg.lecam_weight > 0:
                    lecam = lecam_penalty(logits_real, logits_fake, a.lecam.real, a.lecam.fake)
                    loss = loss + cfg.lecam_weight * lecam
                    terms["gan_lecam"] = lecam.detach()
                if cfg.r1_weight > 0:
                    r1 = r1_penalty(logits_real, real)
                    loss = loss + cfg.r1_weight * r1
                    terms["gan_r1"] = r1.detach()
            accelerator.backward(loss)
        terms["gan_d_total"] = loss.detach()
        names, sums = _accumulate(names, sums, terms)
    terms = _mean_terms(names, sums, len(micro_batches))
    clip = cfg.grad_clip_norm or float("inf")
    grad_norm = accelerator.clip_grad_norm_(a.module.parameters(), clip)
    # The LeCam anchors move with the mean logits over every rank, in the flags' collective.
    means = torch.stack([terms["gan_logits_real"], terms["gan_logits_fake"]])
    ok, flags, means = _agree(terms, grad_norm, accelerator, means)
    _skip_unless(ok, a.optimizer, accelerator)
    a.optimizer.step()
    a.optimizer.zero_grad(set_to_none=True)
    a.lecam.update(means[0], means[1], ok)
    a.disc.requires_grad_(False)
    return StepResult(terms, grad_norm, {f"gan_{k}" if k == "grad_norm" else k: v for k, v in flags.items()}, ok)


def _accumulate(names: list[str] | None, sums: torch.Tensor | None, terms: dict[str, torch.Tensor]):
    """Add one micro-batch's terms to the running sums, kept as one float32 vector: a step costs a few kernels
    for its bookkeeping, not a few per term (on a GPU the small models' steps are launch-bound)."""
    values = torch.stack([v.detach().float() for v in terms.values()])
    if sums is None:
        return list(terms), values
    assert list(terms) == names, (names, list(terms))  # every micro-batch has the same terms
    return names, sums + values


def _mean_terms(names: list[str], sums: torch.Tensor, micro_batches: int) -> dict[str, torch.Tensor]:
    """{name: mean over the micro-batches}: views of one vector (meters and flags stack them back for free)."""
    means = sums / micro_batches if micro_batches > 1 else sums
    return dict(zip(names, means.unbind()))


def _agree(terms: dict[str, torch.Tensor], grad_norm: torch.Tensor, accelerator, means: torch.Tensor | None = None):
    """(ok, per-name flags[, means averaged over ranks]): the non-finite flags of every rank, in one
    small all-reduce, so every rank skips the same steps without a host sync."""
    names = [*terms, "grad_norm"]
    flags = (~torch.isfinite(torch.stack([*terms.values(), grad_norm.float()]))).float()
    n = flags.shape[0]
    packed = flags if means is None else torch.cat([flags, means.float()])
    if accelerator.num_processes > 1:
        packed = accelerator.reduce(packed, "sum")
    flags = packed[:n].clamp(max=1.0)
    ok = flags.sum() == 0
    result = (ok, dict(zip(names, flags.unbind())))
    return result if means is None else (*result, packed[n:] / accelerator.num_processes)


def _skip_unless(ok: torch.Tensor, optimizer, accelerator) -> None:
    """Make the optimizer step a no-op (moments, step counts and weights untouched) unless `ok`."""
    inner = optimizer.optimizer  # the torch optimizer inside Accelerate's wrapper
    if accelerator.scaler is None:
        inner.found_inf = (~ok).float()
    else:  # fp16: the GradScaler skips what it found non-finite when unscaling; add the loss flags
        for found in accelerator.scaler._per_optimizer_states[id(inner)]["found_inf_per_device"].values():
            torch.maximum(found, (~ok).float().to(found.device), out=found)


def configure_backends(train: TrainConfig, device: torch.device) -> None:
    """This process's CUDA math settings (train.tf32, train.cudnn_benchmark); nothing on other devices."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if train.tf32 else "highest")  # "high": TF32 matmuls
    torch.backends.cudnn.allow_tf32 = train.tf32
    torch.backends.cudnn.benchmark = train.cudnn_benchmark


def compiled(module: torch.nn.Module, train: TrainConfig) -> torch.nn.Module:
    return torch.compile(module, mode=None if train.compile_mode == "default" else train.compile_mode)


def build_training(cfg: Config, accelerator: Accelerator, image_size: int,
                   data_range: tuple[float, float] | None = None, fresh: bool = True) -> Training:
    """data_range: array shards' normalization (pipeline.data.data_range); None for images. fresh: False when a
    checkpoint's weights will be loaded over the model (then model.init is not read)."""
    configure_backends(cfg.train, accelerator.device)
    vae = build_model(cfg.model, image_size)
    if cfg.model.init and fresh:  # start from an existing VAE (pipeline/import_diffusers.py); before the EMA copy
        load_init(vae, cfg.model)
    # train.freeze: before the EMA copy and prepare (DDP reduces only parameters that require grad). The EMA
    # still averages the frozen tensors: they equal its copy, so the lerp leaves them bitwise as they are.
    vae.freeze(cfg.train.freeze)
    loss_fn = VAELoss(cfg.loss, vae.output_range, cfg.model.in_channels, cfg.model.spatial_dims, vae.latent_shape)
    _check_latent_regularisers(cfg, vae)
    augment = DeviceAugment(cfg.data, vae.output_range, data_range).to(accelerator.device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    vae = vae.to(accelerator.device, memory_format=memory_format)
    ema = EMA(vae, cfg.optim.ema_decay).to(accelerator.device) if cfg.optim.ema_decay > 0 else None
    if cfg.train.compile:
        keep_eager(vae)  # (after the EMA copy: the average is never compiled)
    module = TrainModule(compiled(vae, cfg.train) if cfg.train.compile else vae, loss_fn)
    # The loss's own parameters (the gaussian log-variance) get no weight decay.
    optimizer = build_optimizer([p for p in vae.parameters() if p.requires_grad],
                                [p for p in loss_fn.parameters() if p.requires_grad], cfg.optim)
    module, optimizer = accelerator.prepare(module, optimizer)
    buffers = FlatBuffers(vae)  # (after prepare, which may move the model: the views must be the final buffers)
    adversary = _build_adversary(cfg, accelerator, vae, image_size, memory_format) if cfg.loss.adversarial.weight > 0 else None
    return Training(vae, loss_fn, augment, ema, module, optimizer, memory_format, buffers, adversary, quantizers(vae))


def _check_latent_regularisers(cfg: Config, vae: torch.nn.Module) -> None:
    v = cfg.loss.vf
    if v.weight > 0 and v.adaptive_weight:
        if not encoder_last_layer(vae).requires_grad:
            raise ConfigError("loss.vf.adaptive_weight measures gradients at the encoder's last layer (its latent "
                              "head), which train.freeze keeps frozen; train that part or set "
                              "loss.vf.adaptive_weight=false")
        if cfg.train.compile:  # two gradients through the compiled VAE before the step's backward, as for the GAN
            torch._functorch.config.donated_buffer = False


def _build_adversary(cfg: Config, accelerator: Accelerator, vae: torch.nn.Module, image_size: int,
                     memory_format: torch.memory_format) -> Adversary:
    """The discriminator with its own optimizer, prepared by Accelerate like the VAE."""
    a = cfg.loss.adversarial
    if a.adaptive_weight and not decoder_last_layer(vae).requires_grad:
        raise ConfigError("loss.adversarial.adaptive_weight measures gradients at the decoder's last layer, which "
                          "train.freeze keeps frozen; train that part or set loss.adversarial.adaptive_weight=false")
    schedule = AdversarialSchedule(a, cfg.train.max_steps)
    disc = build_discriminator(a, cfg.model.in_channels, image_size).to(accelerator.device,
                                                                        memory_format=memory_format)
    critic = compiled(disc, cfg.train) if cfg.train.compile else disc
    if cfg.train.compile and a.adaptive_weight:
        # The adaptive weight takes two gradients through the compiled VAE's backward (retain_graph) before
        # the step's backward; AOTAutograd's donated buffers (freed after one backward) forbid that.
        torch._functorch.config.donated_buffer = False
    optimizer = build_optimizer(disc.parameters(), [], schedule.optim_config())
    module, optimizer = accelerator.prepare(DiscriminatorModule(critic), optimizer)
    disc.requires_grad_(False)  # (after prepare: DDP registers the parameters that require grad)
    lecam = LeCamEMA(a.lecam_ema_decay).to(accelerator.device)
    return Adversary(a, schedule, disc, critic, module, optimizer, lecam, decoder_last_layer(vae))
