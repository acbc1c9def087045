"""LPIPS, rFID and the sharpness ratio with known answers, on weights files made here (nothing downloads):
FID of a set with itself is 0, equals a float64 scipy.linalg.sqrtm reference and grows with noise; LPIPS(x, x)
is 0 and symmetric; bad weights files are one sentence; 1 and 2 processes give the same rFID."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port
from pipeline import metrics
from pipeline.config import ConfigError, MetricsConfig
from test_evaluate import ACCELERATE, run_cli, train_tiny_run


# ------------------------------------------------------------------------------------------------
# Weights files made here: random init, the real networks' names and shapes
# ------------------------------------------------------------------------------------------------


def _random_state(meta_state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Seeded He-initialised tensors in the shapes of a (meta-device) state dict; BatchNorm as at init."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in meta_state.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros((), dtype=torch.long)
        elif name.endswith("running_var") or (t.dim() == 1 and name.endswith("weight")):
            out[name] = torch.ones(t.shape)
        elif t.dim() == 1:  # biases, running means
            out[name] = torch.zeros(t.shape)
        else:
            out[name] = torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """torchvision's AlexNet (its `features`, all LPIPS reads) and torch-fidelity's InceptionV3 with random
    seeded weights, saved as the downloads are: plain state dicts in torch files. Built on the meta device:
    initialising AlexNet's 58M classifier weights only to discard them costs seconds."""
    import torchvision
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    root = tmp_path_factory.mktemp("weights")
    with torch.device("meta"):
        alexnet = torchvision.models.alexnet(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in _random_state(alexnet, 0).items()}, root / "alexnet.pth")
    # torch-fidelity's constructor insists on loading weights; build the bare network once for its shapes.
    saved = fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state, strict=True: None
    fe.load_state_dict_from_url = lambda *args, **kwargs: {}
    try:
        with torch.device("meta"):
            inception = fe.FeatureExtractorInceptionV3("test", ["64"]).state_dict()
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url = saved
    torch.save(_random_state(inception, 1), root / "inception.pth")
    return {"alex": root / "alexnet.pth", "inception": root / "inception.pth"}


# ------------------------------------------------------------------------------------------------
# Sharpness ratio
# ------------------------------------------------------------------------------------------------


def _grating(cycles_per_pixel: float, size: int = 32) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64)
    wave = 0.5 + 0.4 * torch.cos(2 * torch.pi * cycles_per_pixel * x)
    return wave.expand(size, size).expand(1, 3, size, size)


def test_high_frequency_energy_counts_only_frequencies_above_the_cutoff():
    fine, coarse = metrics.high_frequency_energy(_grating(0.375)), metrics.high_frequency_energy(_grating(0.125))
    assert fine.item() > 1000 * coarse.item()  # the Hann window keeps the coarse grating's leakage tiny
    assert metrics.high_frequency_energy(torch.full((2, 3, 16, 16), 0.7)).abs().max() < 1e-20  # flat: nothing


def test_sharpness_ratio_is_one_for_identical_images_below_for_blur_above_for_noise():
    import kornia

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    x = kornia.filters.gaussian_blur2d(x, (5, 5), (1.0, 1.0))  # natural-ish: energy falls with frequency

    def ratio(recon):
        m = metrics.ReconstructionMetrics(None, None, "cpu")
        m.update(recon, x)
        return m.results()["sharpness_ratio"]

    assert ratio(x) == pytest.approx(1.0, abs=1e-12)
    assert ratio(kornia.filters.gaussian_blur2d(x, (5, 5), (1.5, 1.5))) < 0.5
    assert ratio((x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)) > 1.5


# ------------------------------------------------------------------------------------------------
# FID from streamed moments, against scipy
# ------------------------------------------------------------------------------------------------


def _moments(features: torch.Tensor, chunks: int = 1) -> metrics.FeatureMoments:
    m = metrics.FeatureMoments(features.shape[1])
    for part in features.chunk(chunks):
        m.add(part)
    return m


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula in float64: scipy.linalg.sqrtm of S1 S2."""
    import scipy.linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def features() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(48, 48, generator=g, dtype=torch.float64) / 7  # correlated, full-rank features
    a = torch.randn(500, 48, generator=g, dtype=torch.float64) @ mix + 0.3
    b = torch.randn(400, 48, generator=g, dtype=torch.float64) @ (mix * 1.3) + 0.1
    return a, b


def test_fid_of_a_set_with_itself_is_zero(features):
    a, _ = features
    assert abs(metrics.frechet_distance(_moments(a), _moments(a, chunks=7))) < 1e-9


def test_fid_equals_the_float64_scipy_reference(features):
    a, b = features
    reference = _scipy_fid(a.numpy(), b.numpy())
    assert reference > 0.5
    assert metrics.frechet_distance(_moments(a, chunks=3), _moments(b)) == pytest.approx(reference, rel=1e-9)


def test_fid_grows_with_added_noise(features):
    a, _ = features
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(a.shape, generator=g, dtype=torch.float64)
    fids = [metrics.frechet_distance(_moments(a), _moments(a + s * noise)) for s in (0.0, 0.05, 0.2, 0.5)]
    assert fids[0] == pytest.approx(0, abs=1e-9) and all(y > x for x, y in zip(fids, fids[1:])), fids


def test_moments_summed_over_parts_equal_the_moments_of_the_whole(features):
    """What the all-reduce relies on: the flattened moments of disjoint parts add up to those of the union."""
    a, _ = features
    parts = _moments(a[:123]).flat() + _moments(a[123:]).flat()
    whole = metrics.FeatureMoments.from_flat(parts, a.shape[1])
    mean, cov = whole.mean_cov()
    torch.testing.assert_close(mean, a.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov, torch.from_numpy(np.cov(a.numpy(), rowvar=False)), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# LPIPS and the weights files
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # seconds: in make test, not in make test-fast
def test_lpips_of_identical_images_is_zero_symmetric_and_positive_otherwise(weights):
    model = metrics.load_lpips("alex", str(weights["alex"]))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    assert model(x, x).abs().max().item() == 0
    torch.testing.assert_close(model(x, y), model(y, x), rtol=1e-6, atol=1e-7)
    assert (model(x, y) > 0).all()
    tiny = metrics.ReconstructionMetrics(model, None, "cpu")
    with pytest.raises(ConfigError, match="LPIPS \\(alex\\) cannot run on 16 px images"):
        tiny.update(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))


def test_lpips_heads_come_from_the_wheel_and_the_backbone_from_the_given_file(weights):
    import lpips

    model = metrics.load_lpips("alex", str(weights["alex"]))
    heads = torch.load(Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    assert torch.equal(model.lin2.model[1].weight, heads["lin2.model.1.weight"])
    backbone = torch.load(weights["alex"], weights_only=True)
    assert torch.equal(model.net.slice3.state_dict()["6.weight"], backbone["features.6.weight"])


def test_nothing_downloads_without_network(weights, tmp_path, monkeypatch, capsys):
    """With every socket connection refused and an empty TORCH_HOME, both metrics load from the local files;
    without files each is skipped with one line naming the file to fetch."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cfg = MetricsConfig(lpips_backbone_weights=str(weights["alex"]), inception_weights=str(weights["inception"]),
                        fid_features=64)
    m = metrics.ReconstructionMetrics.build(cfg, "cpu")
    assert m.lpips_model is not None and m.inception is not None
    assert not (tmp_path / "torch_home").exists()
    lines = []
    skipped = metrics.ReconstructionMetrics.build(MetricsConfig(), "cpu", lines.append)
    assert skipped.lpips_model is None and skipped.inception is None and len(lines) == 2
    assert "alexnet-owt-7be5be79.pth" in lines[0] and "--lpips-weights" in lines[0]
    assert metrics.INCEPTION_FILE in lines[1] and "--inception-weights" in lines[1]


class NotATensor:  # a pickled object: weights_only=True must refuse it, whatever it would do when unpickled
    pass


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ({"features.0.weight": NotATensor()}, "is not a plain tensor state dict that loads with weights_only=True"),
    ({"conv.weight": torch.zeros(2)}, "does not hold"),
])
def test_a_bad_weights_file_is_one_sentence(tmp_path, content, message):
    path = tmp_path / "w.pth"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(ConfigError, match=message) as e:
        metrics.load_lpips("alex", str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=message):
        metrics.load_inception(str(path))


# ------------------------------------------------------------------------------------------------
# In `python -m pipeline.evaluate`, 1 and 2 processes
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_reports_lpips_rfid_sharpness_and_two_processes_agree_with_one(tiny_shards, weights, tmp_path):
    """Also: the first evaluation computes rFID's reference statistics of the val split and caches them beside
    the shards; the second (on 2 processes) reads that file instead of recomputing it."""
    trained = train_tiny_run(tiny_shards)
    shards = Path(shutil.copytree(tiny_shards, tmp_path / "tiny"))  # the cache is written into the shards folder
    args = [str(trained), "--iwae-k", "1", "--lpips-weights", str(weights["alex"]), "--shards", str(shards),
            "--inception-weights", str(weights["inception"]), "metrics.fid_features=64", "tracking.mode=disabled"]
    one_out, two_out = trained / "eval" / "metrics-one.json", trained / "eval" / "metrics-two.json"
    r = run_cli("pipeline.evaluate", *args, "--out", str(one_out))
    assert r.returncode == 0, r.stderr[-3000:]
    (cache,) = (shards / "fid_stats").iterdir()
    assert f"computed and written to {cache}" in r.stdout
    before = cache.stat()
    launcher = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    r2 = run_cli("pipeline.evaluate", *args, "--out", str(two_out), launcher=launcher)
    assert r2.returncode == 0, r2.stderr[-3000:]
    one, two = json.loads(one_out.read_text()), json.loads(two_out.read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["count"] == two["count"] >= 4
    assert one["rfid"] > 0 and 0 < one["lpips"] and 0 < one["sharpness_ratio"] < 1.5
    assert (one["rfid_features"], one["lpips_net"]) == (64, "alex")
    for key in ("rfid", "lpips", "sharpness_ratio"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    assert "rfid" in r.stdout and "lpips" in r.stdout
    assert f"from {cache}" in r2.stdout and "computed" not in r2.stdout
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert one["rfid_reference"] == two["rfid_reference"] == str(cache)
