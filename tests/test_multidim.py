"""1-D signals and 3-D volumes through the same pipeline (model.spatial_dims): models, losses, shards,
training with exact resume, evaluation, sampling and media.

Tiny widths, 64-sample signals and 8-16 voxel volumes keep this file fast on CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.models import build_model, training_flops_per_image

# (arch, model overrides, expected latent shape for size s and dims d)
ARCHS = {
    "conv": (dict(arch="conv", channels=[4, 8], latent_dim=8), lambda s, d: (8,)),
    "vanilla": (dict(arch="vanilla", channels=[4, 8], latent_dim=8), lambda s, d: (8,)),
    "dcgan": (dict(arch="dcgan", channels=[4, 8], latent="spatial", latent_channels=2),
              lambda s, d: (2, *[s // 4] * d)),
    "dcgan_vector": (dict(arch="dcgan", channels=[4, 8, 8], latent="vector", latent_dim=8), lambda s, d: (8,)),
    "resnet": (dict(arch="resnet", channels=[8, 16], latent_channels=2, attention_levels=[1]),
               lambda s, d: (2, *[s // 2] * d)),
}
SIZES = {1: 32, 3: 8}
CONVS = {1: nn.Conv1d, 3: nn.Conv3d}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("name", list(ARCHS))
def test_model_round_trips_shapes(name, dims):
    kw, latent = ARCHS[name]
    size = SIZES[dims]
    torch.manual_seed(0)
    model = build_model(ModelConfig(in_channels=2, spatial_dims=dims, **kw), size)
    assert model.latent_shape == latent(size, dims)
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ConvTranspose2d)) for m in model.modules())
    assert any(isinstance(m, CONVS[dims]) for m in model.modules())
    x = torch.rand(3, 2, *[size] * dims) * 2 - 1
    out = model(x)
    assert out.recon.shape == x.shape
    assert out.mu.shape == out.logvar.shape == (3, *model.latent_shape)
    assert model.decode(out.mu).shape == x.shape
    assert model.eval().sample(2).shape == (2, 2, *[size] * dims)
    out.recon.mean().backward()  # gradients reach the first layer
    first = next(m for m in model.modules() if isinstance(m, CONVS[dims]))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    assert training_flops_per_image(model, size) > 0


def test_two_d_is_unchanged_by_the_field():
    """Default spatial_dims=2 builds the same parameter names and shapes as before (state_dict keys
    matter to export and to old checkpoints); the LDM parameter count is pinned in test_models.py."""
    model = build_model(ModelConfig(**ARCHS["resnet"][0]), 16)
    assert model.spatial_dims == 2
    assert model.state_dict()["encoder.0.weight"].shape == (8, 3, 3, 3)
    assert model.state_dict()["encoder.5.qkv.weight"].shape == (48, 16, 1, 1)


def test_one_d_attention_mixes_all_positions():
    """Attention over the flattened positions: changing the first sample changes the last output."""
    from pipeline.models.resnet import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(8, dims=1)
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[..., 0] += 5
    assert not torch.allclose(block(x)[..., -1], block(y)[..., -1])
    block3 = AttentionBlock(8, dims=3)
    v = torch.randn(1, 8, 2, 3, 4)
    w = v.clone()
    w[..., 0, 0, 0] += 5
    assert not torch.allclose(block3(v)[..., -1, -1, -1], block3(w)[..., -1, -1, -1])


BAD = [
    (dict(arch="conv", channels=[4, 8, 16], spatial_dims=1), 100,
     "model.channels has 3 levels, which needs the signal length to be divisible by 8, but the shards are "
     "100 samples; use a signal length that is a multiple of 8 or fewer entries in model.channels"),
    (dict(arch="resnet", channels=[4, 8, 16], spatial_dims=3), 6,
     "model.channels has 3 levels (2 downsamples), which needs the volume side to be divisible by 4, but the "
     "shards are 6 voxels"),
    (dict(arch="vanilla", channels=[4, 8], spatial_dims=4), 16, "model.spatial_dims must be 1, 2 or 3, got 4"),
]


@pytest.mark.parametrize("kw,size,message", BAD)
def test_bad_shape_is_one_sentence(kw, size, message):
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(**kw), size)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override,key", [("loss.perceptual.weight=0.5", "loss.perceptual.weight"),
                                          ("loss.adversarial.weight=0.1", "loss.adversarial.weight"),
                                          ("data.rotation_degrees=10", "data.rotation_degrees")])
@pytest.mark.parametrize("dims", [1, 3])
def test_two_d_only_terms_are_refused(dims, override, key):
    with pytest.raises(ConfigError, match=f"{key} is .*, but it works on 2-D images only and model.spatial_dims "
                                          f"is {dims}; set {key}=0"):
        load_config(None, [f"model.spatial_dims={dims}", override], check_paths=False)
    load_config(None, ["model.spatial_dims=2", override], check_paths=False)  # fine for images


def test_spatial_dims_is_validated():
    with pytest.raises(ConfigError, match="model.spatial_dims must be 1, 2 or 3, got 0"):
        load_config(None, ["model.spatial_dims=0"], check_paths=False)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def test_total_variation_known_answers():
    from pipeline.objective.image import total_variation

    sig = torch.tensor([0.2, 0.7] * 8).view(1, 1, 16)  # alternating a, b: |a - b| (L - 1) / L
    assert torch.allclose(total_variation(sig), torch.tensor([0.5 * 15 / 16]))
    assert total_variation(torch.full((2, 3, 16), 0.3)).abs().max() == 0
    # A volume constant along D has, per voxel, the TV of one of its slices (kornia's 2-D TV).
    torch.manual_seed(0)
    img = torch.rand(2, 3, 8, 8)
    vol = img.unsqueeze(2).expand(2, 3, 5, 8, 8).contiguous()
    assert torch.allclose(total_variation(vol), total_variation(img), atol=1e-6)


def test_ssim_one_d_and_three_d_agree_with_kornias_two_d():
    """SSIM is separable: an image whose rows are all the same signal has, with reflected borders, the
    2-D SSIM map of kornia equal to ssim1d of the signal on every row; a volume constant along D has
    kornia's ssim3d equal to kornia's 2-D SSIM of a slice."""
    import kornia

    from pipeline.objective.image import ssim

    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 32), torch.rand(2, 3, 32)
    rows = lambda s: s.unsqueeze(2).expand(2, 3, 9, 32).contiguous()  # noqa: E731
    two_d = kornia.metrics.ssim(rows(a), rows(b), 7, max_val=1.0)
    assert torch.allclose(ssim(a, b, 7), two_d[:, :, 4], atol=1e-5)
    assert torch.allclose(ssim(a, a, 7), torch.ones(2, 3, 32), atol=1e-5)  # a signal with itself: 1
    img1, img2 = torch.rand(2, 1, 12, 12), torch.rand(2, 1, 12, 12)
    vol = lambda s: s.unsqueeze(2).expand(2, 1, 7, 12, 12).contiguous()  # noqa: E731
    assert torch.allclose(ssim(vol(img1), vol(img2), 5)[:, :, 3], kornia.metrics.ssim(img1, img2, 5), atol=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_vae_loss_every_term_in_n_d(dims):
    """recon (gaussian with a log-variance per channel), KL, SSIM and TV for signals and volumes; the
    gaussian per-sample recon equals its closed form."""
    import math

    from pipeline.config import LossConfig
    from pipeline.objective import VAELoss

    size = SIZES[dims]
    torch.manual_seed(0)
    model = build_model(ModelConfig(in_channels=2, spatial_dims=dims, **ARCHS["resnet"][0]), size)
    cfg = LossConfig(recon="gaussian", gaussian_logvar="channel", ssim_weight=0.1, ssim_window=5, tv_weight=0.1)
    loss = VAELoss(cfg, model.output_range, 2, dims)
    with torch.no_grad():
        loss.gaussian_logvar.copy_(torch.tensor([0.0, math.log(4.0)]))
    x = torch.rand(3, 2, *[size] * dims) * 2 - 1
    out = model(x)
    result = loss(out, x, step=0)
    assert set(result.terms) >= {"recon", "kl", "ssim", "ssim_loss", "tv"}
    assert all(torch.isfinite(v) for v in result.terms.values())
    result.total.backward()
    err = (out.recon.detach() - x).square()
    expected = 0.5 * (torch.log(torch.tensor([1.0, 4.0])).view(1, 2, *[1] * dims) + err
                      / torch.tensor([1.0, 4.0]).view(1, 2, *[1] * dims) + math.log(2 * math.pi))
    assert torch.allclose(loss.recon_per_image(out.recon.detach(), x), expected.flatten(1).sum(1), rtol=1e-5)
    assert loss.log_px_z(out.recon.detach(), x).shape == (3,)  # the discretised likelihood for evaluation


def test_perceptual_loss_refused_for_other_dims():
    from pipeline.config import LossConfig, PerceptualConfig
    from pipeline.objective import VAELoss

    with pytest.raises(ConfigError, match="loss.perceptual.weight is 1.0, but it works on 2-D images only"):
        VAELoss(LossConfig(perceptual=PerceptualConfig(weight=1.0)), (-1.0, 1.0), 1, 1)
