"""The latent regularisers (pipeline/objective/latent.py): VF alignment, equivariance, latent noise. Each is
absent when off, sends its gradient where it should, computes what its formula says, and runs in training:
logged, and resumed bitwise after a SIGKILL."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TEST_ENV
from pipeline.config import ConfigError, load_config
from pipeline.models import build_model
from pipeline.objective import VAELoss
from pipeline.objective.latent import apply_transform, noise_sigmas, transforms, vf_losses
from processes import Launch

VF = ["loss.vf.weight=0.1", "loss.vf.backbone=test_vit", "loss.vf.weights=none", "loss.vf.input_size=32"]
EQ = ["loss.equivariance.weight=1", "loss.equivariance.probability=1"]
NOISE = ["loss.latent_noise.weight=1", "loss.latent_noise.sigma_min=0.1", "loss.latent_noise.sigma_max=0.3"]
RESNET = ["model.arch=resnet", "model.channels=[8,16]", "model.latent=spatial", "model.latent_channels=2"]


def build(*overrides: str, size: int = 32):
    cfg = load_config("recipes/demo.yaml", [*RESNET, *overrides], check_paths=False)
    torch.manual_seed(0)
    vae = build_model(cfg.model, size)
    return cfg, vae, VAELoss(cfg.loss, vae.output_range, 3, 2, vae.latent_shape)


def images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


NAMES = ("vf", "vf_distmat", "vf_cos", "vf_adaptive_weight", "vf_weighted", "equivariance", "equivariance_drawn",
         "latent_noise", "latent_noise_sigma")


def test_off_by_default_no_terms_no_parameters_same_total():
    cfg, vae, loss = build()
    assert cfg.loss.vf.weight == cfg.loss.equivariance.weight == cfg.loss.latent_noise.weight == 0
    x = images()
    torch.manual_seed(2)
    out = vae(x)
    with_vae = loss(out, x, 3, vae)
    without = loss(out, x, 3)
    assert not set(NAMES) & set(with_vae.terms)
    assert list(loss.parameters()) == [] and list(loss.state_dict()) == []
    assert torch.equal(with_vae.total, without.total)


@pytest.mark.parametrize("on, names", [(VF, NAMES[:5]), (EQ, NAMES[5:7]), (NOISE, NAMES[7:])])
def test_each_term_is_logged_and_enters_the_total(on, names):
    _, vae, loss = build(*on)
    x = images()
    torch.manual_seed(2)
    out = vae(x)
    plain = loss(out, x, 3)  # no model given: validation's call, no regulariser
    result = loss(out, x, 3, vae)
    assert set(names) <= set(result.terms) and not set(NAMES[:5] if on is not VF else NAMES[5:]) & set(result.terms)
    weighted = {"vf": result.terms.get("vf_weighted"), "eq": result.terms.get("equivariance"),
                "noise": result.terms.get("latent_noise")}
    extra = next(v for v in weighted.values() if v is not None)
    assert float(extra) > 0
    assert torch.allclose(result.total, plain.total + extra, rtol=1e-6)


def grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def test_vf_gradient_reaches_the_encoder_and_the_projection_not_the_decoder_or_the_backbone():
    _, vae, loss = build(*VF)
    x = images()
    out = vae(x)
    vf, distmat, cos = loss.latent.vf_term(out.z[:4], x)
    vf.backward()
    g = grads(vae)
    assert all(g[n] is not None and g[n].abs().sum() > 0 for n in g if n.startswith(("encoder.", "heads.")))
    assert all(g[n] is None for n in g if n.startswith(("decoder", "final_layer")))
    assert loss.latent.vf.proj.weight.grad.abs().sum() > 0
    backbone = loss.latent.vf.features.backbone
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())
    # The projection is the loss's one parameter: trained with the model and in the checkpoint's "loss.*".
    assert [n for n, _ in loss.named_parameters()] == ["latent.vf.proj.weight"]
    assert list(loss.state_dict()) == ["latent.vf.proj.weight"]


def test_vf_adaptive_weight_is_the_gradient_norm_ratio_at_the_encoder_head():
    _, vae, loss = build(*VF)
    x = images()
    out = vae(x)
    result = loss(out, x, 3, vae)
    layer = vae.heads.weight
    rec = loss.cfg.recon_weight * loss.recon_elementwise(out.recon, x).mean()
    vf = loss.latent.vf_term(out.z[:4], x)[0]
    g_rec, = torch.autograd.grad(rec, layer, retain_graph=True)
    g_vf, = torch.autograd.grad(vf, layer)
    expected = g_rec.norm() / (g_vf.norm() + 1e-4)
    assert float(result.terms["vf_adaptive_weight"]) == pytest.approx(float(expected), rel=1e-4)
    assert float(result.terms["vf_weighted"]) == pytest.approx(0.1 * float(expected) * float(vf.detach()), rel=1e-4)


def test_vf_losses_by_their_formulas():
    f = torch.randn(2, 6, 3, 3)
    # A projection equal to the features: both parts 0 whatever the margins.
    d, c = vf_losses(f.clone(), f, 0.0, 0.0)
    assert float(d) == pytest.approx(0, abs=1e-6) and float(c) == pytest.approx(0, abs=1e-6)
    # The opposite direction at every position: cosines -1, the similarity matrices equal (a sign cancels).
    d, c = vf_losses(-f, f, 0.0, 0.5)
    assert float(d) == pytest.approx(0, abs=1e-6) and float(c) == pytest.approx(1 - 0.5 + 1)
    # A finer latent grid is area-averaged onto the features' grid.
    fine = F.interpolate(f, scale_factor=2, mode="nearest")
    d, c = vf_losses(fine, f, 0.0, 0.0)
    assert float(c) == pytest.approx(0, abs=1e-6)


class ToyDecoder(torch.nn.Module):
    """Equivariant to rotations by construction (a pointwise map, then nearest upsampling); `ramp` adds a
    position-dependent image, which no rotation commutes with."""

    def __init__(self, factor: int, ramp: bool = False):
        super().__init__()
        self.factor, self.ramp = factor, ramp

    def _decode(self, z):
        x = F.interpolate(torch.tanh(z[:, :3]), scale_factor=self.factor, mode="nearest")
        if self.ramp:
            x = x + torch.linspace(0, 1, x.shape[-1]).view(1, 1, 1, -1)
        return x


def test_equivariance_transform_commutes_with_an_equivariant_decoder():
    _, _, loss = build(*EQ, "loss.equivariance.scales=[1.0]", "loss.equivariance.rotations_degrees=[90,180,270]")
    reg = loss.latent
    l1 = lambda r, t: (r - t).abs().mean()  # noqa: E731
    z = torch.randn(2, 3, 4, 4)
    toy = ToyDecoder(8)
    x = toy._decode(z)  # images the toy decodes exactly from z
    assert sorted(reg.transforms) == [(1.0, 1), (1.0, 2), (1.0, 3)]
    for _ in range(12):
        eq, drawn = reg.equivariance_term(toy, z, x, l1)
        assert drawn and float(eq) < 1e-7
    # A decoder that does not commute with rotations gets a positive term.
    ramp = ToyDecoder(8, ramp=True)
    eq, _ = reg.equivariance_term(ramp, z, ramp._decode(z), l1)
    assert float(eq) > 0.1
    # Downscaling: a latent constant per channel stays the same under every transform, as its decode does.
    _, _, loss = build(*EQ, "loss.equivariance.scales=[0.5,0.75]", "loss.equivariance.rotations_degrees=[]")
    z = torch.randn(2, 3, 1, 1).expand(2, 3, 4, 4)
    for _ in range(8):
        eq, drawn = loss.latent.equivariance_term(toy, z, toy._decode(z), l1)
        assert drawn and float(eq) < 1e-6


def test_equivariance_transform_shapes_and_the_draws():
    z = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(apply_transform(z, (4, 4), 1), torch.rot90(z, 1, (-2, -1)))
    assert apply_transform(z, (3, 3), 2).shape == (1, 1, 3, 3)
    assert transforms([0.5], [90]) == [(1.0, 1), (0.5, 0), (0.5, 1)]  # never the identity
    assert transforms([1.0], [0, 360, 180]) == [(1.0, 2)]
    _, vae, loss = build(*EQ, "loss.equivariance.probability=0.3")
    torch.manual_seed(0)
    drawn = [loss.latent.draw_transform() is not None for _ in range(2000)]
    assert 0.25 < sum(drawn) / 2000 < 0.35
    # On a draw the decode of the transformed latent is compared with the transformed images: shapes agree.
    x = images()
    out = vae(x)
    torch.manual_seed(3)
    result = loss(out, x, 0, vae)
    assert set(result.terms) >= {"equivariance", "equivariance_drawn"}


def test_equivariance_gradient_reaches_the_decoder_and_the_encoder():
    _, vae, loss = build(*EQ)
    x = images()
    out = vae(x)
    eq, drawn = loss.latent.equivariance_term(vae, out.z, x, lambda r, t: loss.recon_elementwise(r, t).mean())
    assert drawn
    eq.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (vae.final_layer.weight, vae.heads.weight))


def test_noise_sigmas_follow_the_range_and_the_warmup():
    s = noise_sigmas(20000, 0.1, 0.3, warmup_steps=100, step=200, device=torch.device("cpu"))
    assert 0.1 <= float(s.min()) < 0.101 and 0.299 < float(s.max()) <= 0.3
    s = noise_sigmas(20000, 0.1, 0.3, warmup_steps=100, step=50, device=torch.device("cpu"))
    assert 0.05 <= float(s.min()) < 0.051 and 0.149 < float(s.max()) <= 0.15
    assert float(noise_sigmas(10, 0.1, 0.3, 100, 0, torch.device("cpu")).max()) == 0


def test_noise_term_decodes_the_noised_latent_with_the_configured_sigma():
    _, vae, loss = build(*NOISE)
    x = images()
    torch.manual_seed(2)
    out = vae(x)
    result = loss(out, x, 5, vae)
    assert 0.1 <= float(result.terms["latent_noise_sigma"]) <= 0.3
    assert float(result.terms["latent_noise"]) != pytest.approx(float(result.terms["recon"]), rel=1e-6)
    # sigma 0: the noisy decode is the clean one, so the term is the reconstruction loss itself.
    _, vae, loss = build("loss.latent_noise.weight=1", "loss.latent_noise.sigma_max=0")
    out = vae(x)
    result = loss(out, x, 5, vae)
    assert float(result.terms["latent_noise_sigma"]) == 0
    assert float(result.terms["latent_noise"]) == pytest.approx(float(result.terms["recon"]), rel=1e-6)
    # Its gradient reaches the decoder and, through z, the encoder: the total of a loss with only this term on
    # (and no reconstruction or KL weight) is the term.
    _, vae, loss = build(*NOISE, "loss.recon_weight=0", "loss.kl.weight=0")
    loss(vae(x), x, 5, vae).total.backward()
    assert vae.final_layer.weight.grad.abs().sum() > 0 and vae.heads.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides, words", [
    (["model.arch=conv", "model.latent=vector", "model.channels=[8,16]", "loss.equivariance.weight=1"],
     "loss.equivariance.weight is 1.0, but it needs a spatial latent"),
    (["model.arch=conv", "model.latent=vector", "model.channels=[8,16]", *VF],
     "loss.vf.weight is 0.1, but it needs a spatial latent"),
])
def test_architectures_without_a_spatial_latent_are_refused_in_one_sentence(overrides, words):
    cfg = load_config("recipes/demo.yaml", overrides, check_paths=False)
    vae = build_model(cfg.model, 32)
    with pytest.raises(ConfigError, match=words) as e:
        VAELoss(cfg.loss, vae.output_range, 3, 2, vae.latent_shape)
    assert str(e.value).count(". ") == 0 and "\n" not in str(e.value)


def test_latent_noise_works_on_a_vector_latent():
    cfg = load_config("recipes/demo.yaml", ["model.arch=conv", "model.channels=[8,16]", "model.latent_dim=8",
                                            *NOISE], check_paths=False)
    vae = build_model(cfg.model, 32)
    loss = VAELoss(cfg.loss, vae.output_range, 3, 2, vae.latent_shape)
    x = images()
    assert "latent_noise" in loss(vae(x), x, 0, vae).terms


@pytest.mark.parametrize("overrides, words", [
    (["loss.latent_noise.sigma_min=0.5", "loss.latent_noise.sigma_max=0.1"], "sigma_max"),
    (["loss.equivariance.weight=1", "loss.equivariance.scales=[1]", "loss.equivariance.rotations_degrees=[0]"],
     "only the identity"),
    (["loss.equivariance.rotations_degrees=[45]"], "multiples of 90"),
    (["loss.equivariance.scales=[1.5]"], r"factors in \(0, 1\]"),
    (["loss.vf.layers=[1,2]"], "one timm out_index"),
    (["model.quantizer.kind=fsq", "tracking.best_metric=val/psnr", "loss.latent_noise.weight=1"], "quantized"),
])
def test_bad_settings_are_one_sentence(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config("recipes/demo.yaml", overrides, check_paths=False)


@pytest.mark.slow
def test_all_three_in_training_are_logged_and_resume_bitwise(tiny_shards, tmp_path):
    """A tiny resnet with the three terms on: the terms reach metrics.jsonl and the W&B offline run, and a run
    SIGKILLed after step 7 (checkpoint 4) and started again equals the uninterrupted one bit for bit."""
    from pipeline import wandb_log
    from test_resume import args, command, latest, train_rows

    on = [*VF, *EQ, "loss.equivariance.probability=0.5", *NOISE, "loss.latent_noise.warmup_steps=6",
          "tracking.mode=offline", "train.max_steps=10", "tracking.eval_every_steps=100",
          "tracking.media_every_steps=100"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = Launch(command(1, args(tiny_shards, ref_dir, "resnet", 0, *on)), TEST_ENV, ROOT)
    assert ref.wait(300) == 0, ref.output()[-4000:]
    rows = train_rows(ref_dir)
    for name in NAMES:
        assert all(f"loss/{name}" in r for r in rows), name
    assert {r["loss/equivariance_drawn"] for r in rows} == {0.0, 1.0}  # p = 0.5: both outcomes in 10 steps
    sigma = [r["loss/latent_noise_sigma"] for r in rows]
    assert sigma[0] == 0 < sigma[1] <= 0.3 / 6 < 0.1 <= sigma[-1] <= 0.3  # the warm-up: 0 at step index 0
    logged = {k for r in wandb_log.history(ref_dir) for k in r}
    assert {f"loss/{n}" for n in NAMES} <= logged

    first = Launch(command(1, args(tiny_shards, run_dir, "resnet", 0, *on)),
                   {**TEST_ENV, "VAE_PAUSE_AT": "step@8:600"}, ROOT)
    first.wait_until(lambda: len(train_rows(run_dir)) >= 7, 180, "step 7")
    first.kill_all()
    assert latest(run_dir) == 4
    second = Launch(command(1, args(tiny_shards, run_dir, "resnet", 0, *on)), TEST_ENV, ROOT)
    assert second.wait(300) == 0, second.output()[-4000:]
    resumed = {r["step"]: r for r in train_rows(run_dir) if r["segment"] == 2}
    assert sorted(resumed) == list(range(5, 11))
    expected = {r["step"]: r for r in rows}
    diffs = {(s, k): (expected[s][k], r[k]) for s, r in resumed.items() for k in expected[s]
             if k.startswith("loss/") and expected[s][k] != r[k]}
    assert not diffs, dict(list(diffs.items())[:8])
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 10


@pytest.mark.parametrize("then, now, refused", [
    (["loss.vf.weight=0"], ["loss.vf.weight=0.1"], True),  # the checkpoint has no projection to load
    (["loss.vf.weight=0.1"], ["loss.vf.weight=0"], True),  # ... or one this run would not have
    (["loss.vf.weight=0.1"], ["loss.vf.weight=0.5"], False),
    (["loss.vf.weight=0.1"], ["loss.vf.weight=0.1", "loss.vf.backbone=resnet18"], True),
    (["loss.vf.weight=0"], ["loss.vf.backbone=resnet18"], False),
    (["loss.equivariance.weight=0"], ["loss.equivariance.weight=1", "loss.latent_noise.weight=1"], False),
])
def test_resuming_with_the_alignment_switched_or_its_backbone_changed_is_refused(tmp_path, then, now, refused):
    from pipeline.config import to_dict
    from pipeline.resume_policy import check_changes

    saved = {"step": 4, "config": to_dict(load_config("recipes/demo.yaml", then, check_paths=False))}
    cfg = load_config("recipes/demo.yaml", now, check_paths=False)
    if refused:
        with pytest.raises(ConfigError, match="cannot change when a run is resumed"):
            check_changes(saved, cfg, tmp_path)
    else:
        assert check_changes(saved, cfg, tmp_path)
