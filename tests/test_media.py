"""pipeline/media.py: uint8 conversion, grids, slerp, and the pictures of a (tiny, real) VAE."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline import media


class TinyVAE(nn.Module):
    """A small but complete VAE with the pipeline's model API (encode/decode/latent_shape/
    output_range), vector or spatial latent; untrained it decodes to mid-grey-ish noise."""

    def __init__(self, latent: str = "vector", size: int = 16, output: str = "tanh", latent_dim: int = 6):
        super().__init__()
        self.output_range = (-1.0, 1.0) if output == "tanh" else (0.0, 1.0)
        self.act = nn.Tanh() if output == "tanh" else nn.Sigmoid()
        h = size // 2
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.SiLU())
        self.vector = latent == "vector"
        if self.vector:
            self.latent_shape = (latent_dim,)
            self.head = nn.Linear(8 * h * h, 2 * latent_dim)
            self.up = nn.Linear(latent_dim, 8 * h * h)
        else:
            self.latent_shape = (2, h, h)
            self.head = nn.Conv2d(8, 4, 1)
            self.up = nn.Conv2d(2, 8, 1)
        self.dec = nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1)
        self.h = h
        self.modes_seen = []  # train/eval mode at each encode/decode call

    def encode(self, x):
        self.modes_seen.append(self.training)
        f = self.enc(x)
        if self.vector:
            mu, logvar = self.head(f.flatten(1)).chunk(2, dim=1)
        else:
            mu, logvar = self.head(f).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        self.modes_seen.append(self.training)
        f = self.up(z)
        if self.vector:
            f = f.view(-1, 8, self.h, self.h)
        return self.act(self.dec(f))


def images(n=4, size=16, seed=0, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * (hi - lo) + lo


# --- to_uint8 --------------------------------------------------------------------------------

@pytest.mark.parametrize("value, output_range, expected", [
    (-1.0, (-1, 1), 0),
    (1.0, (-1, 1), 255),
    (0.0, (-1, 1), 128),  # 127.5 rounds to even
    (0.5, (-1, 1), 191),  # 191.25
    (3.0, (-1, 1), 255),  # clamped
    (-7.0, (-1, 1), 0),
    (float("nan"), (-1, 1), 0),
    (0.0, (0, 1), 0),
    (1.0, (0, 1), 255),
    (0.2, (0, 1), 51),
])
def test_to_uint8_known_values(value, output_range, expected):
    out = media.to_uint8(torch.full((2, 3, 4, 5), value), output_range)
    assert out.dtype == np.uint8 and out.shape == (2, 4, 5, 3)
    assert (out == expected).all()


def test_to_uint8_layout_single_image_and_grey():
    x = torch.zeros(3, 2, 2)
    x[0] = 1.0  # red channel only
    out = media.to_uint8(x, (0, 1))
    assert out.shape == (1, 2, 2, 3) and out[0, 0, 0].tolist() == [255, 0, 0]
    grey = media.to_uint8(torch.full((1, 1, 2, 2), 0.5), (0, 1))
    assert grey.shape == (1, 2, 2, 3) and (grey == 128).all()
    with pytest.raises(ValueError):
        media.to_uint8(torch.zeros(1, 4, 2, 2), (0, 1))


# --- make_grid -------------------------------------------------------------------------------

@pytest.mark.parametrize("b, nrow, expected_shape", [
    (5, 3, (2 * 6 + 2, 3 * 8 + 2, 3)),
    (3, 3, (1 * 6 + 2, 3 * 8 + 2, 3)),
    (2, 8, (1 * 6 + 2, 2 * 8 + 2, 3)),  # fewer images than nrow: only as wide as needed
    (1, 1, (8, 10, 3)),
])
def test_make_grid_shape(b, nrow, expected_shape):
    tiles = np.full((b, 4, 6, 3), 200, np.uint8)
    assert media.make_grid(tiles, nrow=nrow).shape == expected_shape


def test_make_grid_places_tiles_row_major_with_black_padding():
    tiles = np.stack([np.full((4, 6, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    g = media.make_grid(tiles, nrow=3, padding=2)
    assert g[2, 2].tolist() == [10] * 3  # tile 0 at row 0, col 0
    assert g[2, 2 + 8 * 2].tolist() == [30] * 3  # tile 2 at row 0, col 2
    assert g[2 + 6, 2 + 8].tolist() == [50] * 3  # tile 4 at row 1, col 1
    assert g[0].max() == 0 and g[2 + 6, 2 + 16].max() == 0  # padding, and the empty last slot
    with pytest.raises(ValueError):
        media.make_grid(tiles.astype(np.float32), nrow=3)


# --- slerp -----------------------------------------------------------------------------------

def test_slerp_endpoints_are_the_inputs():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    torch.testing.assert_close(media.slerp(a, b, 0.0), a)
    torch.testing.assert_close(media.slerp(a, b, 1.0), b)
    assert media.slerp(a, b, 0.3).shape == a.shape


def test_slerp_midpoint_keeps_norm_where_lerp_shrinks():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = media.slerp(a, b, 0.5)
    torch.testing.assert_close(mid, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))
    assert mid.norm().item() == pytest.approx(1.0)  # lerp: 0.707
    # typical prior draws in 256-D: same-norm endpoints -> same-norm path, per sample
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 256, generator=g), torch.randn(4, 256, generator=g)
    b = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)
    for t in (0.25, 0.5, 0.75):
        torch.testing.assert_close(media.slerp(a, b, t).norm(dim=1), a.norm(dim=1))
    assert ((0.5 * (a + b)).norm(dim=1) < 0.8 * a.norm(dim=1)).all()


def test_slerp_falls_back_to_lerp_when_parallel():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(media.slerp(a, 2 * a, 0.5), 1.5 * a)
    zero = torch.zeros(1, 3)
    torch.testing.assert_close(media.slerp(zero, a, 0.5), 0.5 * a)
    assert torch.isfinite(media.slerp(a, -a, 0.5)).all()


# --- KL ranking ------------------------------------------------------------------------------

def test_kl_per_dim_closed_form_and_top_dims():
    mu = torch.tensor([[0.0, 1.0, 3.0, 0.0], [0.0, 1.0, 3.0, 0.0]])
    logvar = torch.zeros_like(mu)
    torch.testing.assert_close(media.kl_per_dim(mu, logvar), torch.tensor([0.0, 0.5, 4.5, 0.0]))
    assert media.top_kl_dims(mu, logvar, 2) == [2, 1]
    assert media.top_kl_dims(mu, logvar, 10)[:2] == [2, 1]  # k larger than D: all dims
    spatial = torch.zeros(2, 2, 3, 3)
    spatial[:, 1, 2, 0] = 2.0  # flat index 1*9 + 2*3 + 0 = 15
    assert media.top_kl_dims(spatial, torch.zeros_like(spatial), 1) == [15]


# --- pictures of a model ---------------------------------------------------------------------

@pytest.fixture(params=["vector", "spatial"])
def model(request):
    torch.manual_seed(0)
    return TinyVAE(latent=request.param)


def test_reconstruction_grid_inputs_above_reconstructions(model):
    x = images(4)
    model.train()
    grid = media.reconstruction_grid(model, x)
    assert grid.shape == (2 * 18 + 2, 4 * 18 + 2, 3) and grid.dtype == np.uint8
    inputs = media.to_uint8(x, model.output_range)
    assert (grid[2:18, 2:18] == inputs[0]).all()  # top row: the inputs
    mu, _ = model.encode(x)
    with torch.no_grad():
        recon = media.to_uint8(model.decode(mu), model.output_range)
    assert (grid[20:36, 2 + 18 * 3:18 * 4] == recon[3]).all()  # bottom row: decode(mu), no sampling
    assert model.training and False not in model.modes_seen[-1:]  # train mode restored
    assert model.modes_seen[:2] == [False, False]  # encode/decode ran in eval mode


def test_pictures_run_without_autograd(model):
    x = images(2)
    x.requires_grad_(True)
    seen = []
    orig = model.decode
    model.decode = lambda z: (seen.append(torch.is_grad_enabled()), orig(z))[1]
    media.reconstruction_grid(model, x)
    media.interpolation_strips(model, x[:1], x[1:], steps=8)
    assert seen and not any(seen)


def test_prior_samples_are_a_pure_function_of_z(model):
    z = torch.randn(6, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    a, b = media.prior_samples(model, z, nrow=3), media.prior_samples(model, z, nrow=3)
    assert a.shape == (2 * 18 + 2, 3 * 18 + 2, 3) and (a == b).all()
    assert a[2:18, 2:18].std() > 0


def test_interpolation_strips_start_and_end_at_the_pair(model):
    x = images(4)
    strip = media.interpolation_strips(model, x[:2], x[2:], steps=8)
    assert strip.shape == (2 * 18 + 2, 8 * 18 + 2, 3)  # one row per pair, one column per step
    with torch.no_grad():
        mu, _ = model.eval().encode(x)
        ends = media.to_uint8(model.decode(mu), model.output_range)
    tile = lambda r, c: strip[2 + 18 * r:18 * (r + 1), 2 + 18 * c:18 * (c + 1)]  # noqa: E731
    assert (tile(0, 0) == ends[0]).all() and (tile(0, 7) == ends[2]).all()
    assert (tile(1, 0) == ends[1]).all() and (tile(1, 7) == ends[3]).all()
    with pytest.raises(ValueError):
        media.interpolation_strips(model, x[:2], x[2:3], steps=8)


def test_latent_traversals_one_grid_per_dim(model):
    x = images(2)
    dims = [0, 5]
    grids = media.latent_traversals(model, x, dims, values=[-2.0, 0.0, 2.0])
    assert len(grids) == 2 and all(g.shape == (2 * 18 + 2, 3 * 18 + 2, 3) for g in grids)
    assert not (grids[0] == grids[1]).all()  # different dims move the image differently
    assert grids[0][2:18, 2:18].std() > 0
    with pytest.raises(ValueError):
        media.latent_traversals(model, x, [10_000])


def test_save_png_roundtrip_atomic(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = media.save_png(arr, tmp_path / "sub" / "x.png")
    assert (np.asarray(Image.open(path)) == arr).all()
    assert os.listdir(tmp_path / "sub") == ["x.png"]  # no temporary file left behind


def test_bar_chart_draws_bars():
    chart = media.bar_chart([0.0, 1.0, 4.0, float("nan")], title="KL")
    assert chart.dtype == np.uint8 and chart.ndim == 3 and chart.shape[2] == 3
    assert (chart.reshape(-1, 3) == [52, 101, 164]).all(axis=1).sum() > 100  # bar pixels present


@pytest.mark.parametrize("overrides", [
    ["model.arch=conv", "model.channels=[8,16]", "model.latent_dim=8"],
    ["model.arch=resnet", "model.latent=spatial", "model.channels=[8,16]", "model.latent_channels=2",
     "model.output=sigmoid"],
], ids=["conv-vector-tanh", "resnet-spatial-sigmoid"])
def test_pictures_of_the_real_models(overrides):
    from pipeline.config import load_config
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model(load_config(None, overrides, check_paths=False).model, 16)
    lo, hi = model.output_range
    x = images(4, lo=lo, hi=hi)
    mu, logvar = model.encode(x)
    dims = media.top_kl_dims(mu, logvar, 3)
    z = torch.randn(4, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    pictures = [media.reconstruction_grid(model, x), media.prior_samples(model, z),
                media.interpolation_strips(model, x[:2], x[2:], steps=8),
                *media.latent_traversals(model, x[:1], dims)]
    assert pictures[2].shape == (2 * 18 + 2, 8 * 18 + 2, 3)
    for pic in pictures:
        assert pic.dtype == np.uint8 and pic[2:18, 2:18].std() > 0
