"""Export: a resnet model in LDM's layout loads in diffusers' AutoencoderKL and encodes/decodes as ours (1e-4);
a model diffusers cannot express stops with one sentence; the latent scale is the train split's; --format
safetensors round-trips any model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, TEST_ENV
from pipeline import export
from pipeline.config import BlockSpec, ConfigError, ModelConfig
from pipeline.inference import load_run, split_batches
from pipeline.models import build_model

LDM = dict(arch="resnet", latent="spatial", channels=[32, 64], blocks_per_level=1, latent_channels=4,
           output="linear", downsample_padding="ldm")


def _diffusers_copy(model, cfg: ModelConfig, folder: Path):
    from diffusers import AutoencoderKL

    layout = export.ldm_layout(cfg, model.image_size)
    folder.mkdir(parents=True)
    save_file(export.diffusers_state_dict(model, cfg, layout), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(export.diffusers_config(model, cfg, layout, 1.0, 0.0)))
    return AutoencoderKL.from_pretrained(str(folder)).eval()


def _assert_same_model(ours, theirs, size: int) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    with torch.no_grad():
        mu, logvar = ours.encode(x)
        dist = theirs.encode(x).latent_dist
        z = torch.randn(mu.shape, generator=g)
        torch.testing.assert_close(dist.mean, mu, rtol=0, atol=1e-4)
        torch.testing.assert_close(dist.logvar, logvar, rtol=0, atol=1e-4)
        torch.testing.assert_close(theirs.decode(z).sample, ours.decode(z), rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", [
    {"attention_levels": [1]},                      # LDM kl-f8's: attention only in the middle
    {"attention_levels": [0, 1], "blocks_per_level": 2},  # Attn{Down,Up}*Block2D at level 0
    {"attention_levels": []},                       # mid_block_add_attention=False
])
@pytest.mark.slow  # seconds: in make test, not in make test-fast
def test_an_ldm_layout_model_loads_in_diffusers_and_matches(variant, tmp_path):
    cfg = ModelConfig(**{**LDM, **variant})
    torch.manual_seed(0)
    model = build_model(cfg, 16).eval()
    for p in model.parameters():  # PyTorch's default init leaves GroupNorm at 1/0: move them so a swap shows
        p.data.add_(0.05 * torch.randn_like(p))
    _assert_same_model(model, _diffusers_copy(model, cfg, tmp_path / "vae"), 16)


def test_an_explicit_block_list_in_ldm_layout_maps_like_the_levels(tmp_path):
    levels = ModelConfig(**LDM, attention_levels=[1])
    explicit = ModelConfig(**LDM, attention_levels=[1],
                           encoder=[BlockSpec("conv", 32), BlockSpec("resnet", 32), BlockSpec("downsample"),
                                    BlockSpec("resnet", 64), BlockSpec("resnet", 64), BlockSpec("attention"),
                                    BlockSpec("resnet", 64), BlockSpec("norm_act"), BlockSpec("conv", 8)])
    assert export.ldm_layout(explicit, 16) == export.ldm_layout(levels, 16)
    model = build_model(explicit, 16).eval()
    _assert_same_model(model, _diffusers_copy(model, explicit, tmp_path / "vae"), 16)


@pytest.mark.parametrize("change, message", [
    ({"output": "tanh"}, "model.output is tanh, but diffusers' AutoencoderKL decoder ends at its last convolution"),
    ({"downsample_padding": "symmetric"}, "model.downsample_padding is symmetric"),
    ({"arch": "conv", "latent": "vector"}, "model.arch is conv"),
    ({"channels": [16, 32]}, "give GroupNorm layers [16, 32] groups"),
    ({"logvar_min": -10.0}, "diffusers clamps the log-variance"),
    ({"encoder": [BlockSpec("conv", 32), BlockSpec("resnet", 32), BlockSpec("downsample"), BlockSpec("attention"),
                  BlockSpec("resnet", 64), BlockSpec("resnet", 64), BlockSpec("resnet", 64), BlockSpec("norm_act"),
                  BlockSpec("conv", 8)]},  # attention right after a downsample: no diffusers block does that
     "the explicit model.encoder list is not LDM's layout"),
])
def test_a_model_diffusers_cannot_express_fails_with_one_sentence(change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        export.ldm_layout(ModelConfig(**{**LDM, **change}), 16)
    assert "\n" not in str(e.value) and str(e.value).endswith("export it with --format safetensors instead")


def test_ldm_padding_changes_the_output_but_not_the_parameters():
    """The new option keeps existing models' checkpoints: same tensors, only the downsample's padding differs."""
    torch.manual_seed(0)
    symmetric = build_model(ModelConfig(**{**LDM, "downsample_padding": "symmetric"}), 16).eval()
    ldm = build_model(ModelConfig(**LDM), 16).eval()
    ldm.load_state_dict(symmetric.state_dict(), strict=True)
    x = torch.rand(1, 3, 16, 16)
    assert not torch.allclose(symmetric.encode(x)[0], ldm.encode(x)[0])


# ------------------------------------------------------------------------------------------------
# A trained run through `python -m pipeline.export`
# ------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.export", *args], cwd=ROOT, env=TEST_ENV,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def ldm_run(tiny_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / "ldm"
    args = ["recipes/demo.yaml", f"data.shards={tiny_shards}", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
            "model.arch=resnet", "model.latent=spatial", "model.channels=[32,64]", "model.blocks_per_level=1",
            "model.attention_levels=[1]", "model.latent_channels=4", "model.output=linear",
            "model.downsample_padding=ldm", "data.batch_size_per_device=8", "data.num_workers=0",
            "train.max_steps=6", "train.checkpoint_every_steps=6", "optim.ema_decay=0.5",
            "tracking.mode=disabled", "tracking.eval_every_steps=1000", "tracking.media_every_steps=1000",
            "metrics.in_validation=true"]  # (also checked here: the final validation reports the sharpness ratio)
    r = subprocess.run([sys.executable, "pipeline/train.py", *args], cwd=ROOT, env=TEST_ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_export_diffusers_of_a_trained_run_matches_and_measures_the_latent_scale(ldm_run, tiny_shards, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "vae"
    r = _cli(str(ldm_run), "--format", "diffusers", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                      "export.json"]
    run = load_run(ldm_run, device="cpu")  # the EMA weights
    vae = AutoencoderKL.from_pretrained(str(out)).eval()
    _assert_same_model(run.model, vae, 32)
    # The scale: 1/std and mean of z ~ q(z|x) over the train split, against a Monte-Carlo estimate.
    zs = []
    with torch.no_grad():
        for batch in split_batches(run.cfg, tiny_shards, "train"):
            mu, logvar = run.model.encode(run.to_model_range(batch.images))
            zs.append(mu + torch.randn((64, *mu.shape)) * (0.5 * logvar).exp())
    z = torch.cat(zs, 1).double()
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    stats = json.loads((out / "export.json").read_text())["latent_statistics"]
    assert stats["images"] == manifest["splits"]["train"]["count"] == z.shape[1]
    assert vae.config.scaling_factor == pytest.approx(1 / z.std().item(), rel=0.01)
    assert vae.config.shift_factor == pytest.approx(z.mean().item(), abs=0.01 * z.std().item())
    assert f"scaling_factor {vae.config.scaling_factor:.6g}" in r.stdout
    # Nothing is overwritten without --force; a model that cannot map writes nothing.
    again = _cli(str(ldm_run), "--format", "diffusers", "--out", str(out))
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: --out {out} already exists and is not empty; choose another folder or pass --force"]


@pytest.mark.slow
def test_export_safetensors_round_trips_the_ema_model_and_refuses_unmappable_diffusers(ldm_run, tiny_shards,
                                                                                       tmp_path):
    out = tmp_path / "plain"
    r = _cli(str(ldm_run), "--format", "safetensors", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    run = load_run(ldm_run, device="cpu")
    model = export.load_exported(out)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode(x)[0], run.model.encode(x)[0])
    # A run whose config cannot map (tanh output): one sentence, exit 2, no folder written.
    (tmp_path / "tanh").mkdir()
    for name in ("checkpoints",):
        (tmp_path / "tanh" / name).symlink_to(ldm_run / name)
    (tmp_path / "tanh" / "config.yaml").write_text(
        (ldm_run / "config.yaml").read_text().replace("output: linear", "output: tanh"))
    bad = _cli(str(tmp_path / "tanh"), "--format", "diffusers", "--out", str(tmp_path / "nope"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "model.output is tanh" in bad.stderr and not (tmp_path / "nope").exists()


@pytest.mark.slow
def test_training_validation_reports_the_sharpness_ratio_when_metrics_in_validation(ldm_run):
    """metrics.in_validation=true (off by default): the final validation pass logs val/sharpness_ratio; with no
    weights files configured, LPIPS and rFID are skipped (one line each), not failed."""
    logged = [json.loads(line) for line in (ldm_run / "metrics.jsonl").read_text().splitlines()]
    ratios = [m["val/sharpness_ratio"] for m in logged if "val/sharpness_ratio" in m]
    assert len(ratios) == 1 and 0 < ratios[0] < 10
    assert not any("val/lpips" in m or "val/rfid" in m for m in logged)
