"""The perceptual loss: a frozen timm backbone that stays out of the optimizer and the checkpoints, its
three weight sources (local file, hub, none), and the classifier trainer for the flowers conv VAE's own backbone."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline import classifier
from pipeline.objective import perceptual
from pipeline.config import ConfigError, LossConfig, PerceptualConfig
from pipeline.errors import UserError
from pipeline.objective import VAELoss
from pipeline.objective.perceptual import PerceptualDistance
from pipeline.models.base import VAEOutput
from conftest import ROOT, TEST_ENV

TANH = (-1.0, 1.0)
TINY = "test_resnet"  # timm's own 0.4 M-parameter test model: features at 5 levels


def pcfg(**kw) -> PerceptualConfig:
    return PerceptualConfig(**{"weight": 1.0, "backbone": TINY, "layers": [1, 2, 3], **kw})


def images(b=2, seed=0, size=32):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_identical_images_have_zero_distance_and_different_ones_do_not():
    for distance in ("l1", "l2"):
        d = PerceptualDistance(pcfg(distance=distance), TANH)
        x = images()
        assert d(x, x).item() == 0.0
        far = d(images(seed=1), x).item()
        assert 0 < far <= (2.0 if distance == "l1" else 4.0) * 3  # per-layer bound x 3 layers


def test_backbone_gets_no_gradient_while_the_reconstruction_does():
    loss = VAELoss(LossConfig(perceptual=pcfg(), recon_weight=0.0), TANH, 3)
    recon = images(seed=1).requires_grad_()
    out = VAEOutput(recon=recon, mu=torch.zeros(2, 4), logvar=torch.zeros(2, 4), z=torch.zeros(2, 4))
    loss(out, images(), 0).total.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    backbone = loss.perceptual.backbone
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())


def test_backbone_is_frozen_in_eval_mode_and_kept_out_of_parameters_and_state_dict():
    loss = VAELoss(LossConfig(recon="gaussian", perceptual=pcfg()), TANH, 3)
    assert [n for n, _ in loss.named_parameters()] == ["gaussian_logvar"]  # what the optimizer gets
    assert list(loss.state_dict()) == ["gaussian_logvar"]  # what a checkpoint carries
    parent = torch.nn.ModuleDict({"loss": loss})
    parent.train()
    assert loss.training and not loss.perceptual.backbone.training
    assert not any(m.training for m in loss.perceptual.backbone.modules())
    # .to() of a parent moves it (meta: a device move that works without a GPU); dtypes do not touch it.
    parent.to(torch.float64)
    assert next(loss.perceptual.backbone.parameters()).dtype == torch.float32
    parent.to("meta")
    assert next(loss.perceptual.backbone.parameters()).device.type == "meta"
    assert loss.perceptual._mean.device.type == "meta" and loss.gaussian_logvar.device.type == "meta"


def test_inputs_are_normalised_with_the_backbones_pretrained_cfg():
    d = PerceptualDistance(pcfg(layers=[2]), TANH)
    pc = timm.create_model(TINY).pretrained_cfg
    mean, std = torch.tensor(pc["mean"]).view(1, 3, 1, 1), torch.tensor(pc["std"]).view(1, 3, 1, 1)
    x = images()
    with torch.no_grad():
        (raw,) = d.backbone(((x + 1) / 2 - mean) / std)
        (got,) = d.features((x + 1) / 2)
    assert torch.allclose(got, raw / raw.norm(dim=1, keepdim=True), atol=1e-6)


def test_layer_weights_and_per_image_reduction():
    x, y = images(), images(seed=1)

    def distance(**kw):
        torch.manual_seed(0)  # the same random backbone every time
        return PerceptualDistance(pcfg(**kw), TANH)(y, x, reduction="none")

    per_layer = [distance(layers=[i]) for i in (1, 3)]
    both = distance(layers=[1, 3], layer_weights=[0.25, 2.0])
    assert both.shape == (2,)
    assert torch.allclose(both, 0.25 * per_layer[0] + 2.0 * per_layer[1], rtol=1e-5)


def test_gray_images_are_repeated_to_rgb():
    d = PerceptualDistance(pcfg(), TANH, image_channels=1)
    g = images()[:, :1]
    assert d(g, g).item() == 0.0 and d(images(seed=1)[:, :1], g).item() > 0
    with pytest.raises(ConfigError, match="1- or 3-channel"):
        PerceptualDistance(pcfg(), TANH, image_channels=4)


# ------------------------------------------------------------------------------------------------
# Weight sources
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_is_the_one_used(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model(TINY, num_classes=5)  # a classifier head of another size is dropped
    with torch.no_grad():
        source.conv1[0].weight.copy_(torch.linspace(-1, 1, source.conv1[0].weight.numel())
                                     .view_as(source.conv1[0].weight))
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))

    d = PerceptualDistance(pcfg(weights=str(path)), TANH)
    loaded = d.backbone.state_dict()
    assert torch.equal(loaded["conv1.0.weight"], state["conv1.0.weight"])
    shared = [k for k in loaded if k in state]
    assert len(shared) == len(loaded)  # every backbone tensor has its namesake in the file ...
    assert all(torch.equal(loaded[k], state[k]) for k in shared)  # ... and holds its value
    fresh = timm.create_model(TINY, features_only=True, out_indices=(1, 2, 3)).state_dict()
    assert not torch.equal(fresh["conv1.0.weight"], loaded["conv1.0.weight"])


def test_weights_file_of_another_model_or_missing_file_is_one_sentence(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()}, str(other))
    with pytest.raises(ConfigError, match=r"does not fit backbone test_resnet: \d+ of \d+ tensors"):
        PerceptualDistance(pcfg(weights=str(other)), TANH)
    with pytest.raises(ConfigError, match="neither hub, none nor an existing"):
        PerceptualDistance(pcfg(weights=str(tmp_path / "missing.pth")), TANH)
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    with pytest.raises(ConfigError, match="must end in one of"):
        PerceptualDistance(pcfg(weights=str(bad)), TANH)


def test_trainer_metadata_naming_another_backbone_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(TINY).state_dict().items()}, str(path),
              metadata={"backbone": "resnet18"})
    with pytest.raises(ConfigError, match="holds a resnet18 but loss.perceptual.backbone is test_resnet"):
        PerceptualDistance(pcfg(weights=str(path)), TANH)


def test_hub_without_network_fails_fast_with_advice(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # nothing cached
    monkeypatch.setattr(perceptual, "_reachable", lambda url, timeout=0.5: False)  # no network
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        PerceptualDistance(pcfg(backbone="resnet18", weights="hub"), TANH)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, elapsed
    msg = str(err.value)
    assert "timm/resnet18" in msg and "hf download" in msg and "loss.perceptual.weights" in msg and "path" in msg
    assert "\n" not in msg and hf_constants.HF_HUB_OFFLINE is False  # the offline switch is restored


def test_hub_weights_in_the_local_cache_load_without_network(monkeypatch, tmp_path):
    """A Hub cache copied onto an offline cluster (~/.cache/huggingface) is used as is: no network touched."""
    import huggingface_hub.constants as hf_constants

    hub_id = timm.models.get_pretrained_cfg(TINY).hf_hub_id  # timm/test_resnet.r160_in1k
    repo = tmp_path / ("models--" + hub_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    source = timm.create_model(TINY)
    with torch.no_grad():
        source.conv1[0].weight.fill_(0.125)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))

    def no_network(*a, **k):
        raise AssertionError("the network was probed although the weights are cached")

    monkeypatch.setattr(perceptual, "_reachable", no_network)
    d = PerceptualDistance(pcfg(weights="hub"), TANH)
    assert torch.all(d.backbone.state_dict()["conv1.0.weight"] == 0.125)
    assert hf_constants.HF_HUB_OFFLINE is False


def test_reachability_probe_is_bounded():
    t0 = time.perf_counter()
    assert perceptual._reachable("https://nonexistent.invalid", timeout=0.3) is False
    assert time.perf_counter() - t0 < 1.0


def test_none_weights_warn(caplog):
    with caplog.at_level("WARNING"):
        PerceptualDistance(pcfg(), TANH)
    assert "randomly initialised test_resnet" in caplog.text


def test_bad_backbone_or_layers_are_one_sentence():
    with pytest.raises(ConfigError, match="not a timm model"):
        PerceptualDistance(pcfg(backbone="resnet181"), TANH)
    with pytest.raises(ConfigError, match=r"layers \[1, 7\] do not fit test_resnet, which has feature levels 0..4"):
        PerceptualDistance(pcfg(layers=[1, 7]), TANH)


# ------------------------------------------------------------------------------------------------
# The classifier trainer (the flowers conv VAE's perception network)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_classifier_trainer_end_to_end(tiny_shards, tmp_path):
    recipe = tmp_path / "clf.yaml"
    recipe.write_text(f"data: {{shards: {tiny_shards}, batch_size_per_device: 16, num_workers: 0}}\n"
                      f"loss: {{perceptual: {{backbone: {TINY}, layers: [1, 2]}}}}\n")
    out = tmp_path / "clf.safetensors"
    cmd = [sys.executable, "-m", "pipeline.classifier", str(recipe), "train.seed=1", "--steps", "12",
           "--out", str(out), "--log-every", "6"]
    proc = subprocess.run(cmd, cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "val accuracy" in proc.stdout and f"loss.perceptual.weights={out}" in proc.stdout
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        head = f.get_tensor("fc.weight")
        conv = f.get_tensor("conv1.0.weight")
    classes = json.loads(meta["classes"])
    assert meta["backbone"] == TINY and len(classes) == 5 and head.shape[0] == 5
    assert 0.0 <= float(meta["val_accuracy"]) <= 1.0
    # The file loads through `weights: path`, and it is the trained tensors that are used.
    d = PerceptualDistance(pcfg(weights=str(out), layers=[1, 2]), TANH)
    assert torch.equal(d.backbone.state_dict()["conv1.0.weight"], conv)
    # An existing output is not overwritten without --force (exit code 2, one line).
    again = subprocess.run(cmd, cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "pass --force" in again.stderr


def test_classifier_trainer_refuses_shards_without_classes(tmp_path):
    from pipeline.config import load_config

    shards = tmp_path / "s"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps(
        {"format": 1, "name": "s", "size": 32, "image_format": "png", "classes": [],
         "splits": {"train": {"shards": []}, "val": {"shards": []}}}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{shards: {shards}}}\n")
    cfg = load_config(recipe)
    with pytest.raises(UserError, match="needs class labels"):
        classifier.train_classifier(cfg, tmp_path / "o.safetensors", 1, None, 0.0, "none")
