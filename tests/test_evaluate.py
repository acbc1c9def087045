"""Evaluation with known answers: PSNR/SSIM of identical images, the IWAE bounds' ordering, exactly the
inactive latent dimensions of a model whose decoder ignores them, and one answer whatever the process count."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TEST_ENV, free_port
from pipeline import evaluate
from pipeline.config import load_config, save_config
from pipeline.objective.perceptual import PerceptualDistance
from pipeline.inference import key_noise, load_run, split_batches

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TRAIN_STEPS = 150


def train_tiny_run(shards: Path) -> Path:
    """One small model trained for TRAIN_STEPS steps on the tiny shards (W&B offline), shared by the evaluate
    and sample tests: trained once per session, kept next to the shards."""
    run_dir = shards.parent.parent / "runs" / "trained"
    if (run_dir / "summary.json").exists():
        return run_dir
    args = ["recipes/demo.yaml", f"data.shards={shards}", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
            # The conv VAE and the KL/TV weights demo.yaml had before it became a spatial-latent dcgan: the
            # anomaly ranking in test_sample.py relies on a vector latent whose KL is weighed like this.
            "model.arch=conv", "model.channels=[8,16]", "model.latent_dim=8", "loss.kl.weight=0.001",
            "loss.tv_weight=0.05", "data.batch_size_per_device=16",
            "data.num_workers=1",
            "data.shuffle_buffer_samples=32", "data.val_batch_size_per_device=4", "tracking.log_every_steps=50",
            "tracking.media_every_steps=1000", "tracking.eval_every_steps=1000",
            f"train.checkpoint_every_steps={TRAIN_STEPS}", "optim.warmup_steps=5", "loss.kl.warmup_steps=20",
            f"train.max_steps={TRAIN_STEPS}", "tracking.mode=offline"]
    r = subprocess.run([sys.executable, "pipeline/train.py", *args], cwd=ROOT, env=TEST_ENV, capture_output=True,
                       text=True, timeout=300)
    assert (run_dir / "summary.json").exists(), r.stderr[-3000:]
    return run_dir


def run_cli(module: str, *args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=240)


# ------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------


def test_psnr_of_identical_images_is_the_documented_cap():
    x = torch.rand(3, 3, 16, 16)
    assert evaluate.psnr_per_image(x, x).tolist() == [evaluate.PSNR_CAP_DB] * 3


def test_psnr_known_value_and_agreement_with_kornia():
    import kornia

    x = torch.rand(2, 3, 16, 16) * 0.8
    y = x + 0.1  # MSE 0.01 -> 20 dB
    assert torch.allclose(evaluate.psnr_per_image(y, x), torch.full((2,), 20.0), atol=1e-4)
    z = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    ours = evaluate.psnr_per_image(z, x)
    theirs = torch.stack([kornia.metrics.psnr(z[i], x[i], 1.0) for i in range(2)])
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_ssim_of_identical_images_is_one_and_lower_otherwise():
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(evaluate.ssim_per_image(x, x), torch.ones(2), atol=1e-6)
    assert (evaluate.ssim_per_image((x + 0.2 * torch.randn_like(x)).clamp(0, 1), x) < 0.9).all()


@pytest.mark.parametrize("k, sizes", [(1, [1]), (2, [1, 2]), (12, [1, 2, 4, 12]), (64, [1, 2, 4, 8, 16, 32, 64]),
                                      (7, [1, 7])])
def test_iwae_group_sizes_each_divide_the_next(k, sizes):
    assert evaluate.iwae_group_sizes(k) == sizes


@pytest.mark.parametrize("k", [12, 64])
def test_iwae_bounds_never_decrease_with_k_for_any_weights(k):
    g = torch.Generator().manual_seed(k)
    log_w = torch.randn(k, 5, generator=g, dtype=torch.float64) * 30 - 1000  # spread like image log-weights
    bounds = evaluate.iwae_bounds(log_w)
    values = [bounds[s] for s in evaluate.iwae_group_sizes(k)]
    assert all((b >= a).all() for a, b in zip(values, values[1:]))
    assert torch.allclose(bounds[1], log_w.mean(0))  # group size 1: the Monte-Carlo ELBO
    assert torch.allclose(bounds[k], torch.logsumexp(log_w, 0) - math.log(k))  # Burda et al.'s IWAE_K


def test_a_samples_noise_depends_on_its_key_only():
    a = key_noise(["x", "y", "z"], (4,), 3, seed=1)
    b = key_noise(["z", "x"], (4,), 3, seed=1)
    assert torch.equal(a[:, 0], b[:, 1]) and torch.equal(a[:, 2], b[:, 0])
    assert not torch.equal(key_noise(["x"], (4,), 3, seed=2)[:, 0], a[:, 0])


def test_a_run_folder_without_checkpoint_is_one_sentence(tmp_path, capsys):
    save_config(load_config("recipes/demo.yaml", check_paths=False), tmp_path / "config.yaml")
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: run folder {tmp_path} has no complete checkpoint yet")
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / "nope")])
    assert "is not a run folder (no config.yaml)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# A trained model
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_shards) -> Path:
    return train_tiny_run(tiny_shards)


@pytest.fixture(scope="module")
def evaluated(trained) -> dict:
    """`python -m pipeline.evaluate` in its own process, logging to the run's offline W&B run (no LPIPS or
    Inception weights files: what it prints is kept in eval/one.log for the test of that)."""
    r = run_cli("pipeline.evaluate", str(trained), "--iwae-k", "16", "--out", str(trained / "eval" / "one.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    (trained / "eval" / "one.log").write_text(r.stdout + r.stderr)
    return json.loads((trained / "eval" / "one.json").read_text())


@pytest.mark.slow
def test_evaluate_reports_every_metric_with_consistent_bounds(evaluated, trained, tiny_shards):
    m = evaluated
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert m["count"] == manifest["splits"]["val"]["count"]
    assert m["checkpoint"] == f"step-{TRAIN_STEPS:06d}" and m["weights"] == "ema"
    assert 10 < m["psnr"] < 40 and 0 < m["ssim"] < 1
    assert m["perceptual"] is None  # the recipe names no real backbone weights
    # Discretised likelihood on 8-bit data: a model that learned anything beats uniform (8 bits/dim).
    assert m["likelihood"] == "discretized_laplace" and m["bits_per_dim_comparable"]
    assert 0 < m["iwae_bits_per_dim"] <= m["elbo_bits_per_dim"] < 8
    by_k = [m["iwae_bits_per_dim_by_k"][str(k)] for k in (1, 2, 4, 8, 16)]
    assert all(b <= a for a, b in zip(by_k, by_k[1:])), by_k
    assert by_k[-1] == m["iwae_bits_per_dim"]
    assert m["neg_elbo_nats"] == pytest.approx(m["recon_nll_nats"] + m["kl_nats"])
    assert m["elbo_bits_per_dim"] == pytest.approx(m["neg_elbo_nats"] / (3 * 32 * 32 * math.log(2)))
    assert len(m["kl_per_dim"]) == m["latent_dims"] == 8
    assert sum(m["kl_per_dim"]) == pytest.approx(m["kl_nats"], rel=1e-5)
    assert (trained / "eval" / "latent_usage.png").stat().st_size > 0


@pytest.mark.slow
def test_evaluate_without_weights_files_skips_lpips_and_rfid_with_one_line_each(evaluated, trained):
    """(From test_metrics.py, where it ran evaluate once more on this same run, also without weights files.)"""
    assert evaluated["lpips"] is None and evaluated["rfid"] is None and evaluated["sharpness_ratio"] > 0
    said = (trained / "eval" / "one.log").read_text()
    skip_lines = [line for line in said.splitlines() if "skipped, no metrics." in line]
    assert len(skip_lines) == 2, said[-3000:]


@pytest.mark.slow
def test_evaluate_writes_the_same_numbers_into_the_training_runs_wandb_summary(evaluated, trained):
    from pipeline import wandb_log as wandb_offline

    summary = wandb_offline.summary(trained)
    assert summary["eval/psnr"] == pytest.approx(evaluated["psnr"])
    assert summary["eval/iwae_bits_per_dim"] == pytest.approx(evaluated["iwae_bits_per_dim"])
    assert summary["eval/active_units"] == evaluated["active_units"]
    run_ids = {r.run_id for r in wandb_offline.run_records(trained)}
    assert run_ids == {(trained / "wandb_run_id").read_text().strip()}  # the training run, resumed
    assert any(key == "eval/latent_usage" for key, _, _ in wandb_offline.media(trained))


@pytest.mark.slow
def test_evaluate_reports_the_latent_diagnostics(evaluated, trained):
    """The tiny run's latent is an 8-d vector (no spectrum) and its shards have 5 classes."""
    m = evaluated
    assert 0 <= m["latent/probe_accuracy"] <= 1 and m["latent/probe_samples"] == m["count"]
    assert 0.2 <= m["latent/probe_chance"] < 1  # at least 1 / 5 classes
    assert m["latent/hf_energy_ratio"] is None
    for name in ("mu", "z"):
        assert len(m[f"latent/{name}_channel_mean"]) == len(m[f"latent/{name}_channel_std"]) == 8
        assert m[f"latent/{name}_std_max"] == pytest.approx(max(m[f"latent/{name}_channel_std"]), rel=1e-6)
    said = (trained / "eval" / "one.log").read_text()
    assert "hf energy ratio: n/a (vector latent)" in said and "probe accuracy" in said


@pytest.mark.slow
def test_two_processes_count_each_sample_once_and_agree_with_one(evaluated, trained):
    out = trained / "eval" / "two.json"
    launcher = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    r = run_cli("pipeline.evaluate", str(trained), "--iwae-k", "16", "--out", str(out), "tracking.mode=disabled",
                launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2 and evaluated["world_size"] == 1
    assert two["count"] == evaluated["count"]
    for key in ("psnr", "ssim", "neg_elbo_nats", "iwae_bits_per_dim", "kl_nats"):
        assert two[key] == pytest.approx(evaluated[key], rel=1e-6), key  # float32 per image, batched differently
    assert two["active_units"] == evaluated["active_units"]
    assert two["kl_per_dim"] == pytest.approx(evaluated["kl_per_dim"], rel=1e-6)


@pytest.mark.slow
def test_a_decoder_that_ignores_dims_makes_exactly_those_inactive(trained, tmp_path):
    """The latent dims the decoder ignores carry no information about x, so the ELBO's optimum for them is the
    prior: q(z_d|x) = N(0, 1) for every x. We build that optimum exactly from the trained model (decoder
    columns and encoder rows of those dims zeroed) and check evaluate finds exactly those dims inactive."""
    from safetensors.torch import load_file, save_file

    ignored = [2, 5]
    src = trained / "checkpoints" / f"step-{TRAIN_STEPS:06d}"
    dst = tmp_path / "ignoring" / "checkpoints" / "step-000001"
    dst.mkdir(parents=True)
    (tmp_path / "ignoring" / "config.yaml").write_text((trained / "config.yaml").read_text())
    (dst.parent / "latest").write_text(dst.name)
    for name, prefix in (("model.safetensors", "vae."), ("ema.safetensors", "module.")):
        state = load_file(str(src / name))
        heads_w, heads_b = state[prefix + "heads.weight"], state[prefix + "heads.bias"]  # [mu; logvar] rows
        for d in ignored:
            state[prefix + "decoder_input.0.weight"][:, d] = 0  # the decoder ignores z_d
            heads_w[d], heads_b[d] = 0, 0  # mu_d = 0
            heads_w[8 + d], heads_b[8 + d] = 0, 0  # logvar_d = 0: q(z_d|x) = N(0, 1), the prior
        save_file(state, str(dst / name))

    run = load_run(tmp_path / "ignoring", device="cpu")
    z = torch.randn(4, 8)
    moved = z.clone()
    moved[:, ignored] = torch.randn(4, len(ignored)) * 3
    assert torch.equal(run.model.decode(z), run.model.decode(moved))  # the premise: those dims are ignored

    m = evaluate.main([str(tmp_path / "ignoring"), "--iwae-k", "2", "tracking.mode=disabled"])
    assert m["inactive_dims"] == ignored
    assert m["active_units"] == 8 - len(ignored)
    assert all(m["kl_per_dim"][d] == 0 for d in ignored)
    assert all(m["mu_variance_per_dim"][d] > evaluate.ACTIVE_UNIT_THRESHOLD for d in range(8) if d not in ignored)
    saved = json.loads((tmp_path / "ignoring" / "eval" / "metrics.json").read_text())
    assert saved["inactive_dims"] == ignored


@pytest.mark.slow
def test_perceptual_distance_is_the_recipes_backbone_on_decoded_means(trained, tmp_path):
    # The recipe's backbone has random weights (weights: none): the same seed gives evaluate and us the same one.
    torch.manual_seed(7)
    m = evaluate.main([str(trained), "--perceptual", "on", "--iwae-k", "1", "--out", str(tmp_path / "m.json"),
                       "tracking.mode=disabled"])
    torch.manual_seed(7)
    run = load_run(trained, device="cpu")
    distance = PerceptualDistance(run.cfg.loss.perceptual, run.model.output_range, 3)
    assert m["perceptual_backbone"] == f"{run.cfg.loss.perceptual.backbone} (none)"
    batches = list(split_batches(run.cfg, run.cfg.data.shards, "val", num_workers=0))
    x = torch.cat([run.to_model_range(b.images) for b in batches])
    mu, _ = run.model.encode(x)
    expected = distance(run.model.decode(mu), x, reduction="none").mean().item()
    assert m["perceptual"] == pytest.approx(expected, rel=1e-4)
    assert evaluate.main([str(trained), "--perceptual", "off", "--iwae-k", "1", "--out", str(tmp_path / "n.json"),
                          "tracking.mode=disabled"])["perceptual"] is None


def _fake_run(tmp_path: Path, overrides: list[str], image_size: int) -> Path:
    """A run folder holding an untrained model's weights, as training would lay it out."""
    from safetensors.torch import save_file

    from pipeline.models import build_model

    cfg = load_config("recipes/demo.yaml", [*overrides, "data.shards=/nonexistent/shards"], check_paths=False)
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step-000003"
    ckpt.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    state = {f"vae.{k}": v.contiguous() for k, v in build_model(cfg.model, image_size).state_dict().items()}
    save_file(state, str(ckpt / "model.safetensors"))
    (ckpt.parent / "latest").write_text(ckpt.name)
    return run_dir


def test_image_size_of_a_run_whose_shards_are_gone(tmp_path):
    from pipeline.errors import UserError

    spatial = ["model.arch=resnet", "model.latent=spatial", "model.channels=[8,16]", "model.latent_channels=2"]
    run_dir = _fake_run(tmp_path, spatial, 32)
    with pytest.raises(UserError, match=r"cannot tell the image size .* several sizes fit the weights; "
                                          r"pass --image-size N"):
        load_run(run_dir, device="cpu")  # a fully convolutional model fits every size
    run = load_run(run_dir, device="cpu", image_size=32)
    assert run.image_size == 32 and run.weights == "raw" and run.step == 3
    (run_dir / "model_info.json").write_text(json.dumps({"image_size": 32, "classes": ["a", "b"]}))
    run = load_run(run_dir, device="cpu")
    assert (run.image_size, run.classes, run.model.latent_shape) == (32, ["a", "b"], (2, 16, 16))


@pytest.mark.slow
def test_a_vector_latent_tells_its_image_size_from_its_weights(tmp_path):
    run_dir = _fake_run(tmp_path, ["model.arch=conv", "model.channels=[8,16]", "model.latent_dim=8"], 24)
    assert load_run(run_dir, device="cpu").image_size == 24  # the decoder's Linear has 16 x 6 x 6 outputs


@pytest.mark.slow
def test_lineage_artifacts_are_in_the_offline_files(evaluated, trained, tiny_shards):
    """The training run used the shard set (manifest + references, no tars uploaded), logged its final
    and best weights as model artifact versions staged inside the run folder, and recorded its code
    version; evaluate used the very version (same digest) it evaluated."""
    from safetensors.torch import load_file

    from pipeline import wandb_log

    found = wandb_log.artifacts(trained)
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    shards = {s["file"]: s["sha256"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]}
    datasets = [a for a in found if a["type"] == "dataset"]
    assert datasets and all(a["used"] and a["name"] == f"shards-{manifest['name']}" for a in datasets)
    d = datasets[0]
    assert set(d["files"]) == {"manifest.json", *shards} and d["metadata"]["sha256"] == shards
    for name in shards:  # references only: nothing staged for upload
        assert d["files"][name]["ref"] == f"file://{(tiny_shards / name).resolve()}" and not d["files"][name]["local_path"]
    assert Path(d["files"]["manifest.json"]["local_path"]).read_bytes() == (tiny_shards / "manifest.json").read_bytes()

    outputs = [a for a in found if a["type"] == "model" and not a["used"]]
    final = next(a for a in outputs if "final" in a["aliases"])
    best = next(a for a in outputs if "best" in a["aliases"])
    assert set(final["files"]) == set(best["files"]) == {"weights.safetensors", "config.yaml", "model_info.json"}
    staged = Path(final["files"]["weights.safetensors"]["local_path"])
    assert staged.is_relative_to(trained / "wandb" / "data")  # travels with the run folder to `make sync`
    ema = load_file(str(trained / "checkpoints" / f"step-{TRAIN_STEPS:06d}" / "ema.safetensors"))
    weights = load_file(str(staged))
    assert weights.keys() == {k.removeprefix("module.") for k in ema}
    assert all(torch.equal(weights[k.removeprefix("module.")], v) for k, v in ema.items())
    assert best["metadata"]["metric"] == "val/neg_elbo_nats" and best["metadata"]["step"] <= TRAIN_STEPS

    used_models = [a for a in found if a["type"] == "model" and a["used"]]
    assert used_models and used_models[-1]["digest"] == final["digest"]  # evaluate: the same version

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert wandb_log.config(trained)["code"]["commit"] == head
