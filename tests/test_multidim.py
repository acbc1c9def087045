"""1-D signals and 3-D volumes through the same pipeline (model.spatial_dims): models, losses, shards,
training with exact resume, evaluation, sampling and media.

Tiny widths, 64-sample signals and 8-16 voxel volumes keep this file fast on CPU.
"""

from __future__ import annotations

import re
from pathlib import Path

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


@pytest.mark.parametrize("dims", [1, 3])
def test_validation_bits_per_dim_divide_by_every_value_of_a_sample(dims, fresh_accelerator_state):
    """val/elbo_bits_per_dim of a signal (C*L values) or a volume (C*D*H*W) is -ELBO / (values * ln 2), as
    pipeline.evaluate reports it (it divided by C*size**2 for every dims)."""
    import math
    from types import SimpleNamespace

    from accelerate import Accelerator

    from pipeline.config import DataConfig, LossConfig
    from pipeline.data import DeviceAugment
    from pipeline.evaluate import validate
    from pipeline.objective import VAELoss

    size = SIZES[dims]
    torch.manual_seed(0)
    model = build_model(ModelConfig(in_channels=2, spatial_dims=dims, **ARCHS["resnet"][0]), size)
    loss = VAELoss(LossConfig(recon="mse"), model.output_range, 2, dims)
    augment = DeviceAugment(DataConfig(hflip=False), model.output_range, data_range=(0.0, 1.0))
    batches = [SimpleNamespace(images=torch.rand(3, 2, *[size] * dims))]
    m = validate(model, loss, augment, batches, Accelerator(cpu=True), step=0)
    assert model.values_per_sample == 2 * size ** dims
    assert m["val/elbo_bits_per_dim"] == pytest.approx(m["val/neg_elbo_nats"] / (2 * size ** dims * math.log(2)))


def test_perceptual_loss_refused_for_other_dims():
    from pipeline.config import LossConfig, PerceptualConfig
    from pipeline.objective import VAELoss

    with pytest.raises(ConfigError, match="loss.perceptual.weight is 1.0, but it works on 2-D images only"):
        VAELoss(LossConfig(perceptual=PerceptualConfig(weight=1.0)), (-1.0, 1.0), 1, 1)


# ----------------------------------------------------------------------------------------------
# Shards of arrays: .npy and .wav, bad arrays reported and skipped
# ----------------------------------------------------------------------------------------------


def _wav(path, pcm, width: int, channels: int = 1) -> None:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(8000)
        w.writeframes(pcm)


def test_signal_folder_with_bad_arrays_is_sharded_and_reported(tmp_path):
    """Good .npy ([L], [1, L], any numeric dtype) and PCM .wav (8/16/24-bit) files become float32 [1, L]
    samples with their values kept (wav at full scale); every bad file is skipped with its reason in the
    manifest and the log, none unpickled; the manifest records the shape, dims and normalisation."""
    import json
    import pickle

    import numpy as np

    from pipeline.data.tar import _tar_entries  # noqa: F401  (the reader the trainer uses below)
    from pipeline.shards import write_shards

    src, L = tmp_path / "src", 32
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = {}
    for i in range(6):
        x = rng.uniform(-2, 3, L).astype(np.float32)
        np.save(src / "a" / f"s{i}.npy", x if i % 2 else x[None])
        good[f"a/s{i}.npy"] = x
    np.save(src / "b" / "int16.npy", np.arange(L, dtype=np.int16))
    good["b/int16.npy"] = np.arange(L, dtype=np.float32)
    pcm16 = (np.arange(L) - 16).astype("<i2") * 1024
    _wav(src / "b" / "pcm16.wav", pcm16.tobytes(), 2)
    good["b/pcm16.wav"] = pcm16 / 32768.0
    pcm24 = np.array([-(2 ** 23), -1, 0, 1, 2 ** 23 - 1] + [5] * (L - 5))
    _wav(src / "b" / "pcm24.wav", b"".join(int(v).to_bytes(3, "little", signed=True) for v in pcm24), 3)
    good["b/pcm24.wav"] = pcm24 / 2.0 ** 23
    _wav(src / "b" / "pcm8.wav", bytes(range(100, 100 + L)), 1)
    good["b/pcm8.wav"] = (np.arange(100, 100 + L) - 128) / 128.0

    bad = {}
    np.save(src / "b" / "long.npy", np.zeros(L + 1, np.float32))
    bad["b/long.npy"] = "differs from the data set's [1, 32]"
    np.save(src / "b" / "stereo.npy", np.zeros((2, L), np.float32))
    bad["b/stereo.npy"] = "differs"
    np.save(src / "b" / "cube.npy", np.zeros((2, 2, L), np.float32))
    bad["b/cube.npy"] = "has 3 axes"
    np.save(src / "b" / "nan.npy", np.full(L, np.nan, np.float32))
    bad["b/nan.npy"] = "NaN or inf"
    np.save(src / "b" / "inf.npy", np.full(L, np.inf))
    bad["b/inf.npy"] = "NaN or inf"
    np.save(src / "b" / "complex.npy", np.zeros(L, np.complex64))
    bad["b/complex.npy"] = "not numeric"
    np.save(src / "b" / "strings.npy", np.array(["x"] * L))
    bad["b/strings.npy"] = "not numeric"
    marker = tmp_path / "unpickled"
    np.save(src / "b" / "object.npy", np.array([_Boom(str(marker))] * L, dtype=object), allow_pickle=True)
    bad["b/object.npy"] = "pickled Python objects (an object array"
    (src / "b" / "truncated.npy").write_bytes((src / "a" / "s1.npy").read_bytes()[:100])
    bad["b/truncated.npy"] = "not a readable .npy"
    (src / "b" / "empty.npy").write_bytes(b"")
    bad["b/empty.npy"] = "empty"
    (src / "b" / "text.wav").write_text("not audio")
    bad["b/text.wav"] = "not a PCM .wav"
    (src / "b" / "pickle.npy").write_bytes(pickle.dumps([1, 2, 3]))
    bad["b/pickle.npy"] = "pickled Python objects"
    (src / "b" / "notes.txt").write_text("ignored")

    lines: list[str] = []
    m = write_shards(src, tmp_path / "out", "sig", spatial_dims=1, workers=1, progress=False, log=lines.append,
                     val_fraction=0.3)
    assert not marker.exists(), "an object array was unpickled"
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert sorted(reasons) == sorted(bad), reasons
    for path, word in bad.items():
        assert word in reasons[path] and "\n" not in reasons[path], (path, reasons[path])
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == len(good)
    assert (m["kind"], m["spatial_dims"], m["sample_shape"], m["dtype"], m["size"]) == ("array", 1, [1, L],
                                                                                        "float32", L)
    values = np.concatenate([v.ravel() for v in good.values()])
    assert m["normalization"]["low"] == pytest.approx(values.min()) and m["normalization"]["source"] == "data"
    assert m["normalization"]["high"] == pytest.approx(values.max())
    assert any("skipped b/nan.npy: holds NaN or inf" in line for line in lines)
    assert json.loads((tmp_path / "out" / "sig" / "manifest.json").read_text()) == m

    # The readers hand out exactly those values as float32 [B, 1, L].
    from pipeline.config import load_config
    from pipeline.data import val_batches

    cfg = load_config(None, [f"data.shards={tmp_path / 'out' / 'sig'}", "model.spatial_dims=1", "model.in_channels=1",
                             "data.num_workers=0", "data.val_batch_size_per_device=4"])
    got = {}
    for split in ("train", "val"):
        for batch in val_batches(cfg, 0, 1, split=split):
            assert batch.images.dtype == torch.float32 and batch.images.shape[1:] == (1, L)
            got.update({k: v for k, v in zip(batch.keys, batch.images)})
    assert len(got) == len(good)
    wanted = [v.ravel().astype(np.float32) for v in good.values()]
    for v in got.values():  # every stored sample is one of the good files, values kept (wav at full scale)
        match = [i for i, w in enumerate(wanted) if np.array_equal(v.numpy().ravel(), w)]
        assert len(match) == 1
        wanted.pop(match[0])

    # --range fixes the normalisation instead of the data's min/max; it is recorded.
    m2 = write_shards(src, tmp_path / "out", "sig2", spatial_dims=1, workers=1, progress=False, log=lines.append,
                      value_range=(-4.0, 4.0))
    assert m2["normalization"] | {"how": ""} == {"low": -4.0, "high": 4.0, "source": "given", "how": ""}


class _Boom:
    """Unpickling one of these would create a file: proof that nothing in sharding unpickles."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_volumes_shard_channels_last_and_non_cubes_are_refused(tmp_path):
    import numpy as np

    from pipeline.shards import ShardsError, write_shards

    src = tmp_path / "vol"
    src.mkdir()
    for i in range(4):
        np.save(src / f"{i}.npy", np.full((4, 4, 4, 2), i, np.uint8))  # channels last
    m = write_shards(src, tmp_path / "out", "v", spatial_dims=3, channels_last=True, workers=1, progress=False,
                     log=lambda s: None)
    assert m["sample_shape"] == [2, 4, 4, 4] and m["skipped"] == []
    for i in range(5):  # now the most common shape: [1, 2, 4, 8]
        np.save(src / f"flat{i}.npy", np.zeros((2, 4, 8), np.float32))
    with pytest.raises(ShardsError, match="the volumes in .* are 2 x 4 x 8 voxels, but the models need cubes"):
        write_shards(src, tmp_path / "out", "v", spatial_dims=3, workers=1, progress=False, log=lambda s: None)


def test_shards_cli_refuses_parts_for_arrays(tmp_path):
    from pipeline.shards import main

    assert main([str(tmp_path), "--spatial-dims", "1", "--parts", "2", "--merge"]) == 2


def test_training_refuses_shards_of_other_dims(signal_shards):
    from pipeline.data import check_fits, read_manifest

    m = read_manifest(signal_shards)
    for overrides, message in ((["model.spatial_dims=3"], "holds 1-D signals but model.spatial_dims is 3; "
                                                          "set model.spatial_dims=1"),
                               (["model.spatial_dims=1", "model.in_channels=3"],
                                "holds samples of shape [1, 64] ([C, *spatial]) but model.in_channels is 3")):
        cfg = load_config(None, overrides, check_paths=False)
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_fits(cfg, m, str(signal_shards))
    with pytest.raises(ConfigError, match="holds 2-D images but model.spatial_dims is 1"):
        check_fits(load_config(None, ["model.spatial_dims=1"], check_paths=False), {"size": 32}, "x")


def test_media_draws_signals_and_volumes():
    from pipeline import media

    sig = torch.zeros(2, 1, 50)
    sig[1, 0] = torch.linspace(-1, 1, 50)
    tiles = media.to_tiles(sig, (-1.0, 1.0))
    assert tiles.shape == (2, *media.SIGNAL_TILE, 3) and tiles.dtype == "uint8"
    blue = (tiles[1] == media.CURVE_COLOURS[0]).all(-1)
    rows = blue.nonzero()[0]
    assert rows.min() < 10 and rows.max() > media.SIGNAL_TILE[0] - 10  # a ramp spans the plot's height
    under = media.to_tiles(sig[:1], (-1.0, 1.0), under=sig[1:])
    assert (under[0] == media.UNDER_COLOUR).all(-1).any()  # the input drawn in grey under the reconstruction
    vol = torch.zeros(1, 1, 8, 8, 8)
    vol[0, 0, 4, :, :] = 1.0  # the mid-slice across D is bright, the others show a bright line
    tiles = media.to_tiles(vol, (0.0, 1.0))
    assert tiles.shape == (1, 64, 3 * 64 + 4, 3)
    assert tiles[0, :, :64].min() == 255 and tiles[0, :, 66:130].mean() < 255 / 4


# ----------------------------------------------------------------------------------------------
# The recipes through the same trainer, evaluation and sample tools
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(signal_shards, volume_shards, tmp_path_factory):
    """recipes/signals1d.yaml and recipes/volumes3d.yaml, tiny, 6 steps each through pipeline/train.py."""
    import subprocess
    import sys

    from conftest import ROOT, TEST_ENV

    root = tmp_path_factory.mktemp("runs")
    # The signals again with a given range twice theirs (--range -2 2): the model sees them at half amplitude.
    subprocess.run([sys.executable, "-m", "pipeline.shards", str(signal_shards.parents[1] / "src"), "--name", "wide",
                    "--spatial-dims", "1", "--range", "-2", "2", "--out", str(root), "--workers", "1"],
                   check=True, cwd=ROOT, env=TEST_ENV, capture_output=True)
    out = {}
    for name, shards, extra in (("signals1d", root / "wide", ["model.channels=[8,16]", "model.attention_levels=[1]"]),
                                ("volumes3d", volume_shards, ["model.channels=[4,8]", "loss.ssim_window=3"])):
        r = subprocess.run([sys.executable, "pipeline/train.py", f"recipes/{name}.yaml", f"data.shards={shards}",
                            f"run.dir={root}", "train.max_steps=6", "data.batch_size_per_device=8",
                            "data.num_workers=0", "tracking.mode=disabled", "tracking.media_every_steps=6",
                            "tracking.eval_every_steps=6", "tracking.log_every_steps=3", "tracking.media_images=4",
                            "train.checkpoint_every_steps=6", *extra],
                           cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        out[name] = root / name
    return out


@pytest.mark.slow  # end-to-end: two training subprocesses
@pytest.mark.parametrize("name, dims", [("signals1d", 1), ("volumes3d", 3)])
def test_recipe_trains_evaluates_and_samples(runs, name, dims, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from pipeline import evaluate, sample

    run = runs[name]
    info = json.loads((run / "model_info.json").read_text())
    assert info["spatial_dims"] == dims and info["normalization"]["low"] < info["normalization"]["high"]
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val/psnr" in line]
    assert val and np.isfinite(val[-1]["val/psnr"]) and -1 <= val[-1]["val/ssim"] <= 1
    recon = np.asarray(Image.open(run / "media" / "recon-000006.png"))
    assert recon.ndim == 3 and recon.shape[0] > 100 and recon.std() > 5  # line plots / mid-slices, not blank
    if dims == 1:  # the inputs row shows the signals as the model sees them: normalised, at half amplitude
        from pipeline import media

        first = recon[2:2 + media.SIGNAL_TILE[0], 2:2 + media.SIGNAL_TILE[1]]
        rows = (first == media.CURVE_COLOURS[0]).all(-1).any(1).nonzero()[0]
        assert 0 < rows.max() - rows.min() < 0.6 * media.SIGNAL_TILE[0], (rows.min(), rows.max())

    import yaml

    shards = yaml.safe_load((run / "config.yaml").read_text())["data"]["shards"]
    m = evaluate.main([str(run), "--iwae-k", "2", "tracking.mode=disabled", "--out", str(tmp_path / "m.json")])
    assert m["count"] == json.loads((Path(shards) / "manifest.json").read_text())["splits"]["val"]["count"]
    assert np.isfinite(m["psnr"]) and np.isfinite(m["ssim"]) and np.isfinite(m["neg_elbo_nats"])
    assert np.isfinite(m["sharpness_ratio"]) and m["lpips"] is None

    prior = sample.main([str(run), "prior", "--n", "3", "--out", str(tmp_path / "prior.npy")])
    x = np.load(prior[0], allow_pickle=False)
    size = 64 if dims == 1 else 8
    assert x.shape == (3, 1, *[size] * dims) and x.dtype == np.float32
    low, high = info["normalization"]["low"], info["normalization"]["high"]
    assert low - 1e-4 <= x.min() and x.max() <= high + 1e-4  # in the data's units

    written = sample.main([str(run), "reconstruct", shards, "--out", str(tmp_path / "rec")])
    inputs, recons = (np.load(tmp_path / "rec" / f, allow_pickle=False) for f in ("inputs.npy", "recons.npy"))
    assert inputs.shape == recons.shape and inputs.shape[1:] == (1, *[size] * dims)
    assert low - 1e-4 <= inputs.min() and inputs.max() <= high + 1e-4
    assert {p.name for p in written} == {"inputs.npy", "recons.npy", "index.csv", "preview.png"}
    sample.main([str(run), "encode", shards, "--out", str(tmp_path / "lat")])
    mu = np.load(tmp_path / "lat" / "mu.npy", allow_pickle=False)
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    assert mu.shape[0] == manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"]
    assert mu.shape[1:] == (4, *[size // (2 if dims == 1 else 4)] * dims)  # the recipes' 4-channel latents
    with pytest.raises(SystemExit) as exit_:
        sample.main([str(run), "traverse"])
    assert exit_.value.code == 2


def test_encode_shards_refuses_array_runs(tmp_path, capsys):
    from pipeline import sample

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  spatial_dims: 1\n  in_channels: 1\n")
    with pytest.raises(SystemExit) as exit_:
        sample.main([str(run), "encode", str(tmp_path), "--format", "shards"])
    assert exit_.value.code == 2
    assert "encode --format shards reads image shards; for signals and volumes use encode --format npy" \
        in capsys.readouterr().err
