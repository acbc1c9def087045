"""The adversarial stage: the PatchGAN, its losses against known answers, the adaptive weight (finite under
bf16/fp16 and non-finite gradients), the schedule, the config's sentences, and the two optimizer steps in
this process: which parameters each step moves, and that neither step leaks gradients into the other.
The 2-process run, its W&B panels and exact resume are in tests/test_resume.py (the "gan" case)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import AdversarialConfig, ConfigError, load_config
from pipeline.objective.adversarial import (AdversarialSchedule, LeCamEMA, NLayerDiscriminator, adaptive_weight,
                                            build_discriminator, decoder_last_layer, discriminator_loss,
                                            generator_loss, lecam_penalty, max_layers, r1_penalty)

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, layers, side", [(32, 2, 6), (32, 3, 2), (64, 3, 6), (128, 3, 14), (16, 2, 2)])
def test_patchgan_logit_map_size(size, layers, side):
    disc = build_discriminator(AdversarialConfig(disc_layers=layers, disc_channels=8), 3, size)
    assert disc(torch.zeros(2, 3, size, size)).shape == (2, 1, side, side)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules())  # no running statistics


def test_a_discriminator_too_deep_for_the_image_size_is_one_sentence():
    assert max_layers(16) == 2
    with pytest.raises(ConfigError, match=r"disc_layers=3 is too deep for 16 px images .* at most 2 layers"):
        build_discriminator(AdversarialConfig(disc_layers=3), 3, 16)


@pytest.mark.parametrize("kind, real, fake, d_loss, g_loss", [
    ("hinge", 0.0, 0.0, 1.0, 0.0),            # 0.5 * (relu(1) + relu(1)); -E D(G)
    ("hinge", 2.0, -2.0, 0.0, 2.0),           # both margins met: no discriminator loss
    ("hinge", -1.0, 1.0, 2.0, -1.0),          # 0.5 * (2 + 2)
    ("non_saturating", 0.0, 0.0, math.log(2), math.log(2)),
    ("non_saturating", 3.0, -3.0, math.log1p(math.exp(-3)), math.log1p(math.exp(3))),
])
def test_losses_known_answers(kind, real, fake, d_loss, g_loss):
    r, f = torch.full((2, 1, 3, 3), real), torch.full((2, 1, 3, 3), fake)
    assert discriminator_loss(kind, r, f).item() == pytest.approx(d_loss, rel=1e-6)
    assert generator_loss(kind, f).item() == pytest.approx(g_loss, rel=1e-6)


def test_lecam_penalty_and_its_ema():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    # relu(real - ema_fake)^2 with ema_fake = 2: [0, 1] -> 0.5; relu(ema_real - fake)^2 with ema_real = -0.5: [0.25, 0] -> 0.125
    assert lecam_penalty(real, fake, torch.tensor(-0.5), torch.tensor(2.0)).item() == pytest.approx(0.625)
    ema = LeCamEMA(decay=0.9)
    ema.update(torch.tensor(2.0), torch.tensor(-2.0), torch.tensor(True))  # first update: the values
    assert (ema.real.item(), ema.fake.item()) == (2.0, -2.0)
    ema.update(torch.tensor(float("nan")), torch.tensor(0.0), torch.tensor(False))  # a skipped step: nothing moves
    assert (ema.real.item(), ema.fake.item(), ema.count.item()) == (2.0, -2.0, 1)
    ema.update(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(True))
    assert ema.real.item() == pytest.approx(1.8) and ema.fake.item() == pytest.approx(-1.8)


def test_r1_is_the_squared_input_gradient_norm():
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    w = torch.randn(2, 4, 4)
    logits = (x * w).flatten(1).sum(1)  # d logits_i / d x_i = w
    assert r1_penalty(logits, x).item() == pytest.approx(w.square().sum().item(), rel=1e-5)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_layer():
    layer = torch.nn.Parameter(torch.randn(4, 3))
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    rec, gan = (layer * a).sum(), (layer * b).sum()  # gradients a and b
    expected = a.norm() / (b.norm() + 1e-4)
    assert adaptive_weight(rec, gan, layer, 1e4).item() == pytest.approx(expected.item(), rel=1e-5)
    # fp16's loss scale changes nothing but the precision the gradients are taken in
    assert adaptive_weight(rec, gan, layer, 1e4, loss_scale=torch.tensor(65536.0)).item() == pytest.approx(
        expected.item(), rel=1e-5)
    assert adaptive_weight(rec, gan * 1e-9, layer, 50.0).item() == 50.0  # clamped


@pytest.mark.parametrize("poison", ["inf", "nan", "zero"])
def test_adaptive_weight_never_returns_nan_or_inf(poison):
    """The NaN of latent-diffusion #176: a non-finite or vanishing generator gradient (fp16 overflow or
    underflow) must give a finite weight, 0 when the ratio is not finite."""
    layer = torch.nn.Parameter(torch.randn(4, 3))
    rec = (layer * torch.randn(4, 3)).sum()
    scale = {"inf": float("inf"), "nan": float("nan"), "zero": 0.0}[poison]
    gan = (layer * scale).sum()
    w = adaptive_weight(rec, gan, layer, 1e4)
    assert torch.isfinite(w) and 0 <= w.item() <= 1e4
    if poison != "zero":
        assert w.item() == 0.0


def test_adaptive_weight_under_bf16_autocast_is_finite_and_float32():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    critic = NLayerDiscriminator(3, 8, 2)
    x = torch.randn(2, 4, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon = conv(x)
        logits = critic(recon)
    rec = (recon.float() - 0.5).abs().mean()
    w = adaptive_weight(rec, generator_loss("hinge", logits), conv.weight, 1e4)
    assert w.dtype == torch.float32 and torch.isfinite(w) and w.item() > 0


@pytest.mark.parametrize("arch", ["conv", "dcgan", "vanilla", "resnet"])
def test_decoder_last_layer_is_the_layer_that_makes_the_image(arch):
    from pipeline.models import build_model

    cfg = load_config(None, [f"model.arch={arch}", "model.channels=[8,16]"], check_paths=False)
    vae = build_model(cfg.model, 32)
    layer = decoder_last_layer(vae)
    recon = vae.decode(torch.randn(2, *vae.latent_shape))
    # The last layer: its gradient is exactly what a loss on the image gives with everything else fixed,
    # and it has the image's 3 channels on one side.
    assert 3 in layer.shape[:2]
    (g,) = torch.autograd.grad(recon.square().mean(), layer)
    assert g.abs().sum() > 0
    if arch == "resnet":
        assert layer is vae.final_layer.weight


def test_schedule_disc_start_as_step_or_fraction():
    s = AdversarialSchedule(AdversarialConfig(weight=1.0, disc_start=0.25, disc_warmup_steps=10), max_steps=200)
    assert (s.disc_start, s.gen_start) == (50, 60)
    assert [s.disc_active(k) for k in (49, 50)] == [False, True]
    assert [s.gen_active(k) for k in (59, 60)] == [False, True]
    assert AdversarialSchedule(AdversarialConfig(weight=1.0, disc_start=30), 200).disc_start == 30
    off = AdversarialSchedule(AdversarialConfig(weight=0.0), 200)
    assert not off.disc_active(1000) and not off.gen_active(1000)


@pytest.mark.parametrize("override, message", [
    ("loss.adversarial.disc_start=2.5", "loss.adversarial.disc_start is 2.5: give a whole step number, or a fraction"),
    ("loss.adversarial.loss=wasserstein", "loss.adversarial.loss is 'wasserstein' but must be one of hinge, non_saturating"),
    ("loss.adversarial.disc_warmup_steps=-1", "loss.adversarial.disc_warmup_steps must be 0 or more"),
])
def test_bad_adversarial_settings_are_one_sentence(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], check_paths=False)


def test_r1_with_compile_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="r1_weight needs a double backward .* set train.compile=false"):
        load_config(None, ["loss.adversarial.weight=1", "loss.adversarial.r1_weight=1", "train.compile=true"],
                    check_paths=False)


# --------------------------------------------------------------------------------------------
# The two steps, in this process
# --------------------------------------------------------------------------------------------


GAN = ["model.arch=resnet", "model.channels=[8,16]", "model.latent=spatial", "model.latent_channels=2",
       "loss.adversarial.weight=0.5", "loss.adversarial.disc_channels=8", "loss.adversarial.disc_layers=2",
       "loss.adversarial.lecam_weight=0.1", "loss.adversarial.r1_weight=0.1", "train.grad_accum_steps=2",
       "data.batch_size_per_device=4"]


def _build(tiny_shards, *extra, mixed_precision="no"):
    from accelerate import Accelerator

    from pipeline.step import build_training

    cfg = load_config("recipes/demo.yaml", [f"data.shards={tiny_shards}", *GAN, *extra])
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2, mixed_precision=mixed_precision)
    return cfg, accelerator, build_training(cfg, accelerator, 32)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return sorted(k for k, v in module.state_dict().items() if not torch.equal(before[k], v))


@pytest.mark.slow  # seconds: in make test, not in make test-fast
@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_generator_step_moves_only_the_vae_and_discriminator_step_only_the_discriminator(tiny_shards,
                                                                                          mixed_precision):
    from pipeline.step import discriminator_step, train_step

    cfg, accelerator, t = _build(tiny_shards, mixed_precision=mixed_precision)
    a = t.adversary
    g = torch.Generator().manual_seed(0)
    micro = [torch.rand(4, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2)]
    vae0, disc0 = _snapshot(t.vae), _snapshot(a.disc)

    result = train_step(t, accelerator, micro, step=0, cfg=cfg)
    assert bool(result.ok) and set(result.terms) >= {"gan_g", "gan_adaptive_weight", "gan_g_weighted"}
    assert all(torch.isfinite(v) for v in result.terms.values()), result.terms
    assert _changed(disc0, a.disc) == [] and all(p.grad is None for p in a.disc.parameters())
    assert len(_changed(vae0, t.vae)) > 0
    assert len(result.fakes) == 2 and not result.fakes[0].requires_grad

    vae1 = _snapshot(t.vae)
    d = discriminator_step(a, accelerator, micro, result.fakes, step=0)
    assert bool(d.ok) and {"gan_d", "gan_lecam", "gan_r1", "gan_disc_accuracy"} <= set(d.terms)
    assert all(torch.isfinite(v) for v in d.terms.values()), d.terms
    assert _changed(vae1, t.vae) == [] and all(p.grad is None for p in t.vae.parameters())
    assert len(_changed(disc0, a.disc)) == len(disc0)  # every discriminator tensor moved
    assert a.lecam.count.item() == 1 and not any(p.requires_grad for p in a.disc.parameters())

    disc1 = _snapshot(a.disc)  # the next generator step, after a discriminator step: still no gradient reaches D
    assert "gan_g" in train_step(t, accelerator, micro, step=1, cfg=cfg).terms
    assert _changed(disc1, a.disc) == [] and all(p.grad is None for p in a.disc.parameters())


def test_a_nonfinite_discriminator_step_changes_nothing(tiny_shards):
    from pipeline.step import discriminator_step

    cfg, accelerator, t = _build(tiny_shards)
    a = t.adversary
    micro = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(2)]
    assert bool(discriminator_step(a, accelerator, micro, [m.flip(-1) for m in micro], step=0).ok)
    fakes = [torch.full((4, 3, 32, 32), float("nan")), micro[1].clone()]
    disc0, lecam0 = _snapshot(a.disc), _snapshot(a.lecam)
    opt0 = {k: {n: v.clone() for n, v in s.items()} for k, s in a.optimizer.state_dict()["state"].items()}
    d = discriminator_step(a, accelerator, micro, fakes, step=1)
    assert not bool(d.ok) and d.nonfinite["gan_d"] == 1
    assert _changed(disc0, a.disc) == [] and _changed(lecam0, a.lecam) == []
    opt1 = a.optimizer.state_dict()["state"]
    assert all(torch.equal(opt0[k][n], opt1[k][n]) for k in opt0 for n in opt0[k])  # moments and step counts


@pytest.mark.slow  # seconds: in make test, not in make test-fast
def test_before_disc_start_nothing_of_the_stage_runs(tiny_shards):
    from pipeline.step import train_step

    cfg, accelerator, t = _build(tiny_shards, "loss.adversarial.disc_start=5", "loss.adversarial.disc_warmup_steps=3")
    micro = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(2)]
    assert not any(k.startswith("gan") for k in train_step(t, accelerator, micro, 4, cfg).terms)
    assert train_step(t, accelerator, micro, 7, cfg).fakes  # D trains (warm-up): it needs the fakes
    assert "gan_g" not in train_step(t, accelerator, micro, 7, cfg).terms
    assert "gan_g" in train_step(t, accelerator, micro, 8, cfg).terms


def test_switching_the_stage_on_for_a_pretrained_run_and_off_again(tiny_shards, tmp_path, capsys):
    """Pre-train without the discriminator, continue with it (a fresh discriminator, said once), and back
    (the VAE continues; the discriminator in the checkpoint is said to be unused)."""
    from pipeline.checkpoint import Checkpointer

    _, accelerator, plain = _build(tiny_shards, "loss.adversarial.weight=0")
    ckpt = Checkpointer(tmp_path, accelerator, every_steps=1, keep=3)
    ckpt.save(1, plain.parts, {"step": 1})
    _, accelerator, gan = _build(tiny_shards)
    fresh = _snapshot(gan.adversary.disc)
    assert ckpt.load(ckpt.resolve("auto"), gan.parts).step == 1
    assert "holds no discriminator (trained without loss.adversarial)" in capsys.readouterr().out
    assert _changed(fresh, gan.adversary.disc) == []
    assert all(torch.equal(a, b) for a, b in zip(plain.vae.state_dict().values(), gan.vae.state_dict().values()))

    ckpt.save(2, gan.parts, {"step": 2})
    _, accelerator, off = _build(tiny_shards, "loss.adversarial.weight=0")
    assert ckpt.load(ckpt.resolve("auto"), off.parts).step == 2
    assert "holds a discriminator, but this run has loss.adversarial off" in capsys.readouterr().out

