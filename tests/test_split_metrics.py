"""pipeline.split_metrics: the latent diagnostics on known answers, and one answer whatever the process count.

The high-frequency ratio of latents with a known spectrum; the linear probe on latents that give the class
away and on latents that carry none of it; validation's val/latent/* from real shards' labels and keys; and
SplitMetrics over 1 process and over 2 gloo processes with unevenly split samples (one rank even empty)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TEST_ENV, free_port
from pipeline.config import ModelConfig
from pipeline.models import build_model
from pipeline.split_metrics import SplitMetrics, latent_hf_ratio

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


# ------------------------------------------------------------------------------------------------
# High-frequency energy ratio
# ------------------------------------------------------------------------------------------------


def _grid(dims: int, side: int) -> torch.Tensor:
    """Integer coordinates [dims, side, ..., side]."""
    return torch.stack(torch.meshgrid(*[torch.arange(side)] * dims, indexing="ij")).double()


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_hf_ratio_of_constant_checkerboard_smooth_and_mixed_latents(dims):
    side = 8
    coords = _grid(dims, side)
    checker = (-1.0) ** coords.sum(0)  # all energy at Nyquist on every axis
    smooth = torch.cos(2 * torch.pi * coords[0] / side)  # 1/8 cycle per position: below the 0.25 cutoff
    constant = torch.full_like(checker, 3.0)  # an offset, no variation
    latents = torch.stack([constant, checker, smooth, checker + smooth * 2 ** 0.5, checker + 3]).unsqueeze(1)
    latents = torch.cat([latents, torch.zeros_like(latents)], 1)  # a dead second channel changes nothing
    ratio = latent_hf_ratio(latents)
    # checker + sqrt(2) cos: equal energies (the cosine's mean square is 1/2), so half is high-frequency;
    # a channel's offset is not spatial variation: checker + 3 is a checkerboard
    assert ratio.tolist() == pytest.approx([0.0, 1.0, 0.0, 0.5, 1.0], abs=1e-12)


def test_hf_ratio_is_per_sample_and_averaged_over_samples():
    vae = _model()
    acc = SplitMetrics(vae, "cpu")
    mu = torch.zeros(4, *vae.latent_shape)
    mu[:2] = (-1.0) ** _grid(2, vae.latent_shape[1]).sum(0)  # two checkerboards (1) and two constants (0)
    acc.update(torch.zeros(4, 3, 16, 16), torch.zeros(4, 3, 16, 16), mu)
    assert acc.compute()["latent/hf_energy_ratio"] == pytest.approx(0.5)


def test_vector_latents_have_no_spectrum_and_their_dims_count_as_channels():
    torch.manual_seed(0)
    vae = build_model(ModelConfig(arch="conv", channels=[4, 8], latent_dim=6), 16)
    acc = SplitMetrics(vae, "cpu")
    mu = torch.arange(6.0).repeat(3, 1)
    acc.update(torch.zeros(3, 3, 16, 16), torch.zeros(3, 3, 16, 16), mu, torch.zeros_like(mu), z=mu * 2)
    m = acc.compute()
    assert m["latent/hf_energy_ratio"] is None
    assert m["latent/mu_channel_mean"] == pytest.approx(list(range(6))) and m["latent/mu_std_max"] == 0
    assert m["latent/z_channel_mean"] == pytest.approx([2.0 * i for i in range(6)])
    assert m["latent/z_mean_abs_max"] == pytest.approx(10.0)


def test_channel_mean_and_std_over_samples_and_positions():
    vae = _model()  # latent 3 x 8 x 8
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(10, *vae.latent_shape, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    z = mu + 1.5
    acc = SplitMetrics(vae, "cpu")
    for part in (slice(0, 3), slice(3, 10)):
        acc.update(torch.zeros(mu[part].shape[0], 3, 16, 16), torch.zeros(mu[part].shape[0], 3, 16, 16), mu[part],
                   z=z[part])
    m = acc.compute()
    per_channel = mu.transpose(0, 1).reshape(3, -1).double()
    assert m["latent/mu_channel_mean"] == pytest.approx(per_channel.mean(1).tolist(), abs=1e-6)
    assert m["latent/mu_channel_std"] == pytest.approx(per_channel.std(1, correction=0).tolist(), rel=1e-6)
    assert m["latent/z_channel_mean"] == pytest.approx((per_channel.mean(1) + 1.5).tolist(), abs=1e-6)
    assert m["latent/z_std_min"] == pytest.approx(per_channel.std(1, correction=0).min().item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Linear probe
# ------------------------------------------------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="resnet", channels=[8, 16], latent_channels=3), 16)


def _probe(mu: torch.Tensor, labels: torch.Tensor, batch: int = 16) -> dict:
    """SplitMetrics' figures over latents `mu` of a model with the same latent shape, in batches."""
    latent_shape = tuple(mu.shape[1:])
    vae = _model() if len(latent_shape) > 1 else build_model(
        ModelConfig(arch="conv", channels=[4, 8], latent_dim=latent_shape[0]), 16)
    assert tuple(vae.latent_shape) == latent_shape
    acc = SplitMetrics(vae, "cpu")
    x = torch.zeros(1, 3, 16, 16)
    for i in range(0, mu.shape[0], batch):
        m = mu[i:i + batch]
        acc.update(x.expand(m.shape[0], -1, -1, -1), x.expand(m.shape[0], -1, -1, -1), m,
                   labels=labels[i:i + batch], keys=[f"k{j}" for j in range(i, i + m.shape[0])])
    return acc.compute()


def test_probe_reads_the_class_off_latents_that_give_it_away():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (90,), generator=g)
    mu = torch.randn(90, 3, 8, 8, generator=g)  # per-position noise, averaged away by the pooling ...
    mu += torch.nn.functional.one_hot(labels, 3).float().view(90, 3, 1, 1) * 2  # ... and the class in a channel
    m = _probe(mu, labels)
    assert m["latent/probe_accuracy"] == 1.0 and m["latent/probe_samples"] == 90
    assert m["latent/probe_chance"] == pytest.approx(torch.bincount(labels).max().item() / 90)


def test_probe_is_at_chance_on_latents_without_class_information():
    """64-d random latents, 240 samples: a classifier scored on the samples it was fitted on would reach far
    above chance (about 0.6 here); held-out folds keep it at chance."""
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(240) % 4
    m = _probe(torch.randn(240, 64, generator=g), labels)
    assert m["latent/probe_chance"] == 0.25
    assert abs(m["latent/probe_accuracy"] - 0.25) < 0.1, m["latent/probe_accuracy"]


def test_probe_is_skipped_without_classes_or_keys():
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(20, 3, 8, 8, generator=g)
    assert _probe(mu, torch.full((20,), -1))["latent/probe_accuracy"] is None  # unlabelled shards
    assert _probe(mu, torch.zeros(20, dtype=torch.long))["latent/probe_accuracy"] is None  # one class
    acc = SplitMetrics(_model(), "cpu")
    acc.update(torch.zeros(20, 3, 16, 16), torch.zeros(20, 3, 16, 16), mu, labels=torch.arange(20) % 2, keys=[])
    assert acc.compute()["latent/probe_accuracy"] is None


# ------------------------------------------------------------------------------------------------
# The validation pass, on real shards
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # seconds: in make test, not in make test-fast
def test_validation_logs_the_latent_diagnostics_from_the_shards_labels(tiny_shards, fresh_accelerator_state):
    from accelerate import Accelerator

    from pipeline.config import load_config
    from pipeline.data import DeviceAugment, val_batches
    from pipeline.evaluate import validate
    from pipeline.objective import VAELoss

    cfg = load_config(None, [f"data.shards={tiny_shards}", "model.arch=resnet", "model.channels=[8,16]",
                             "model.latent_channels=3", "data.num_workers=0", "data.val_batch_size_per_device=4"],
                      check_paths=False)
    torch.manual_seed(0)
    model = build_model(cfg.model, 32)
    loss = VAELoss(cfg.loss, model.output_range, 3, 2)
    augment = DeviceAugment(cfg.data, model.output_range)
    m = validate(model, loss, augment, val_batches(cfg, 0, 1), Accelerator(cpu=True), step=0)
    assert 0 <= m["val/latent/probe_accuracy"] <= 1 and 0 < m["val/latent/probe_chance"] < 1
    assert 0 < m["val/latent/hf_energy_ratio"] < 1
    assert 0 < m["val/latent/mu_std_min"] <= m["val/latent/mu_std_max"]
    assert 0 < m["val/latent/z_std_min"] <= m["val/latent/z_std_max"] and m["val/latent/z_mean_abs_max"] >= 0
    # a sane number of W&B keys: per-channel lists stay in pipeline.evaluate's file
    assert not any(k.endswith("_channel_mean") or k.endswith("_channel_std") for k in m)
    assert "val/latent/probe_samples" not in m and "val/inactive_dims" not in m and "inactive_dims" not in m


# ------------------------------------------------------------------------------------------------
# 1 process == 2 processes
# ------------------------------------------------------------------------------------------------


def _worker(tmp_path: Path, processes: int, shares: tuple[int, ...] = (13,)) -> list[dict]:
    out = tmp_path / f"p{processes}"
    out.mkdir()
    launch = ([sys.executable] if processes == 1 else
              [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no"])
    done = subprocess.run([*launch, "tests/split_metrics_worker.py", str(out), ",".join(map(str, shares))],
                          cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"figures-{share}.json").read_text()) for share in shares]


@pytest.mark.slow
def test_two_processes_with_uneven_shares_give_one_process_figures(tmp_path):
    """tests/split_metrics_worker.py: the same 60 samples on 1 process, and on 2 gloo processes split 13 / 47
    and 0 / 60. Every figure, the probe's included, is the one-process figure (sums, not means of means; the
    probe's folds follow the sample keys, not the ranks)."""
    [one] = _worker(tmp_path, 1)
    assert one["world"] == 1 and one["count"] == 60
    assert 0.3 < one["latent/probe_accuracy"] < 1  # the class is partly in the latents: a real fit is compared
    for share, two in zip((13, 0), _worker(tmp_path, 2, (13, 0))):  # both splits in one 2-process launch
        assert two.pop("world") == 2
        assert set(two) == set(one) - {"world"}
        for key, value in two.items():
            if isinstance(value, float):
                assert value == pytest.approx(one[key], rel=1e-9, abs=1e-12), (share, key)
            elif isinstance(value, list):
                assert value == pytest.approx(one[key], rel=1e-6, abs=1e-9), (share, key)  # float32 lists
            else:
                assert value == one[key], (share, key)
