"""benchmarks/bench_quality.py: each arm turns on exactly the term it is named after on the demo recipe, the table
carries the latent diagnostics, and (slow) `--arms latent` runs end to end through train.py and evaluate."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import ROOT
from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.objective import VAELoss

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_quality  # noqa: E402

TERM = {"plain": None, "vf": "vf_weighted", "equivariance": "equivariance", "latent_noise": "latent_noise",
        "adversarial": None}
REGULARISERS = {"vf_weighted", "equivariance", "latent_noise"}


@pytest.mark.parametrize("name", list(bench_quality.latent_arms()))
def test_each_latent_arm_turns_on_its_term_alone_on_the_demo_recipe(name):
    steps = 200
    cfg = load_config("recipes/demo.yaml", bench_quality.latent_arms()[name](steps), check_paths=False)
    torch.manual_seed(0)
    vae = build_model(cfg.model, 32)
    loss = VAELoss(cfg.loss, vae.output_range, 3, 2, vae.latent_shape)
    if name == "equivariance":
        loss.latent.cfg.equivariance.probability = 1.0  # draw the transform on this one step
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    terms = {k for k, v in loss(vae(x), x, steps, vae).terms.items() if k in REGULARISERS}
    assert terms == ({TERM[name]} if TERM[name] else set())
    result = loss(vae(x), x, steps, vae)
    if TERM[name]:
        assert float(result.terms[TERM[name]]) > 0
    if name == "vf":  # the random-init backbone named in the table, aligned at the latent's own grid
        assert cfg.loss.vf.weights == "none" and cfg.loss.vf.backbone == "resnet10t"
    if name == "latent_noise":  # the noise warm-up scales with the run: 5 % of it
        assert cfg.loss.latent_noise.warmup_steps == steps // 20


def test_adversarial_arms_unchanged():
    arms = bench_quality.adversarial_arms()
    assert list(arms) == ["plain", "adversarial"]
    assert arms["plain"](100) == [] and "loss.adversarial.disc_warmup_steps=10" in arms["adversarial"](100)
    load_config("recipes/demo.yaml", arms["adversarial"](100), check_paths=False)


def test_latent_table_shows_the_probe_and_hf_energy_of_each_run():
    metrics = {"psnr": 25.0, "ssim": 0.8, "sharpness_ratio": 0.9, "latent/probe_accuracy": 0.625,
               "latent/probe_chance": 0.2, "latent/hf_energy_ratio": 0.125}
    row = bench_quality.result_row("vf", 40, {"wall_seconds": 61.0}, metrics)
    row["images_per_second"] = 52.4
    table = bench_quality.format_table([row], "latent")
    assert "| vf | 40 | 61 | 52 | 25.00 | 0.8000 | 0.900 | 0.625 (0.200) | 0.1250 |" in table
    assert "skipped" in bench_quality.format_table([bench_quality.result_row("plain", 40, {"wall_seconds": 1},
                                                                              {**metrics, "latent/hf_energy_ratio": None})],
                                                   "latent")


@pytest.mark.slow
def test_latent_arms_end_to_end(tiny_shards, tmp_path):
    rows = bench_quality.main(["--arms", "latent", "--shards", str(tiny_shards), "--out", str(tmp_path),
                               "--steps", "2"])  # equal steps: no calibration runs
    assert [r["variant"] for r in rows] == ["plain", "vf", "equivariance", "latent_noise"]
    for r in rows:
        assert r["steps"] == 2 and r["psnr"] > 0 and r["probe_accuracy"] is not None
        assert 0 <= r["hf_energy_ratio"] <= 1
    assert json.loads((tmp_path / "quality-latent.json").read_text()) == rows
    # the regulariser really ran in its arm: its term is in the run's logged metrics, and not in plain's
    logged = {r: (tmp_path / r / "metrics.jsonl").read_text() for r in ("plain", "vf", "equivariance", "latent_noise")}
    assert "loss/vf" not in logged["plain"] and "loss/latent_noise" not in logged["plain"]
    assert "loss/vf" in logged["vf"] and "loss/equivariance" in logged["equivariance"]
    assert "loss/latent_noise" in logged["latent_noise"]
