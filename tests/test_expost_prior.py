"""The ex-post prior (pipeline/prior.py) and the classifier score (pipeline/sample_score.py): EM recovers a known
mixture, the fit is bitwise reproducible and the same on 1 and 2 processes, the file is plain safetensors,
training writes it without changing what it trains, `sample prior` uses it, and the score has its known
answers."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TEST_ENV, free_port
from pipeline import media, sample
from pipeline.errors import UserError
from pipeline.inference import load_run
from pipeline.prior import FILE_NAME, ExpostPrior, fit_gmm
from pipeline.sample_score import inception_like_score, summarize

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

# A known mixture in 3 dimensions: weights, means, and covariances with correlations.
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MEANS = torch.tensor([[0.0, 0.0, 0.0], [6.0, 1.0, -2.0], [-4.0, 5.0, 3.0]], dtype=torch.float64)
_A = torch.tensor([[[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.3, 0.5]],
                   [[0.5, 0.0, 0.0], [0.0, 1.2, 0.0], [-0.4, 0.0, 0.7]],
                   [[0.9, 0.0, 0.0], [0.0, 0.4, 0.0], [0.2, 0.2, 0.3]]], dtype=torch.float64)
COVS = _A @ _A.transpose(1, 2)


def mixture_data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    eps = torch.randn((n, 3, 1), generator=g, dtype=torch.float64)
    return MEANS[comp] + (_A[comp] @ eps)[..., 0]


def matched(prior: ExpostPrior) -> list[int]:
    """For each true component, the index of the fitted one with the nearest mean."""
    return [int((prior.means - m).norm(dim=1).argmin()) for m in MEANS]


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_recovers_a_known_mixture(covariance):
    prior = fit_gmm(mixture_data(6000), 3, covariance, ridge=1e-4, seed=0)
    idx = matched(prior)
    assert sorted(idx) == [0, 1, 2]
    assert torch.allclose(prior.weights[idx], WEIGHTS, atol=0.02), prior.weights[idx]
    assert torch.allclose(prior.means[idx], MEANS, atol=0.08), prior.means[idx]
    expected = COVS if covariance == "full" else COVS.diagonal(dim1=1, dim2=2)
    assert torch.allclose(prior.covariances[idx], expected, atol=0.08), prior.covariances[idx]
    assert prior.meta["converged"] and prior.meta["iterations"] < 100


def test_samples_follow_the_fitted_mixture():
    """sample() draws component k with its weight and its full covariance (mean and covariance per component
    of 40000 draws, told apart by the nearest mean)."""
    prior = ExpostPrior(WEIGHTS, MEANS, COVS, (3,))
    z = prior.sample(40000, torch.Generator().manual_seed(1)).double()
    comp = torch.cdist(z, MEANS).argmin(1)
    for k in range(3):
        zk = z[comp == k]
        assert abs(len(zk) / len(z) - float(WEIGHTS[k])) < 0.015
        assert torch.allclose(zk.mean(0), MEANS[k], atol=0.05)
        assert torch.allclose(torch.cov(zk.T), COVS[k], atol=0.06)
    log_p = prior.log_prob(MEANS[:1])
    by_hand = sum(float(WEIGHTS[k]) * torch.distributions.MultivariateNormal(MEANS[k], COVS[k]).log_prob(MEANS[0])
                  .exp() for k in range(3))
    assert torch.allclose(log_p, by_hand.log()[None])


def test_the_same_seed_gives_the_same_file_bit_for_bit_and_another_seed_another(tmp_path):
    x = mixture_data(500, seed=3)
    files = [fit_gmm(x, 4, "full", seed=s).save(tmp_path / f"{i}.safetensors") for i, s in enumerate((7, 7, 8))]
    a, b, c = (f.read_bytes() for f in files)
    assert a == b
    assert a != c  # the seed is what picks the k-means++ centres


def test_the_fit_does_not_depend_on_the_callers_thread_count():
    """A launcher sets OMP_NUM_THREADS=1 for its workers and a plain `python` uses every core: the fit must
    give the same bits either way (MKL's Cholesky factor of a 1024 x 1024 matrix differs between 1 and 2 threads)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 1024, generator=g, dtype=torch.float64)
    x = x + torch.randn(600, 1024, generator=g, dtype=torch.float64) + 3 * (torch.arange(600) % 3)[:, None]
    before = torch.get_num_threads()
    fits = []
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            fits.append(fit_gmm(x, 3, "full", max_iterations=2, seed=0))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(getattr(fits[0], k), getattr(fits[1], k)) for k in ("weights", "means", "covariances"))
    assert fits[0].meta == fits[1].meta  # the log-likelihood goes through the Cholesky factors


def test_the_file_is_plain_safetensors_and_a_pickle_is_refused(tmp_path):
    prior = fit_gmm(mixture_data(300), 3, "diag", seed=0, latent_shape=(1, 3, 1))
    prior.meta.update({"step": 5, "weights": "ema"})
    path = prior.save(tmp_path / FILE_NAME)
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])  # safetensors: length, JSON, raw arrays
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"} == {
        "weights": ("F64", [3]), "means": ("F64", [3, 3]), "covariances": ("F64", [3, 3])}
    assert json.loads(header["__metadata__"]["expost_prior"])["covariance"] == "diag"
    back = ExpostPrior.load(path)
    assert torch.equal(back.means, prior.means) and back.latent_shape == (1, 3, 1)
    assert back.meta["step"] == 5 and back.meta["weights"] == "ema"

    evil = tmp_path / "evil.safetensors"
    torch.save({"weights": prior.weights}, evil)  # a pickle: must be refused, never loaded
    with pytest.raises(UserError, match="not a readable ex-post prior"):
        ExpostPrior.load(evil)


# --------------------------------------------------------------------------------------------
# The score
# --------------------------------------------------------------------------------------------


def test_score_is_one_for_identical_predictions_and_k_for_confident_even_ones():
    same = torch.tensor([[0.7, 0.2, 0.1]]).repeat(60, 1)
    assert inception_like_score(same) == pytest.approx(1.0, abs=1e-12)
    k = 5
    confident = torch.eye(k).repeat(12, 1)  # each class 12 times, probability 1
    assert inception_like_score(confident) == pytest.approx(k, rel=1e-9)
    soft = 0.9 * torch.eye(k).repeat(12, 1) + 0.1 / k  # less sure: between 1 and k
    assert 1 < inception_like_score(soft) < k
    half_sure = torch.cat([torch.eye(k).repeat(6, 1), torch.full((30, k), 1 / k)])  # p(y) uniform; KL log k or 0
    assert inception_like_score(half_sure) == pytest.approx(k ** 0.5, rel=1e-9)  # exp of the mean KL
    one_class = torch.eye(k)[[2] * 30]  # confident but always the same class: 1 again
    assert inception_like_score(one_class) == pytest.approx(1.0, abs=1e-12)
    hist = summarize(confident[:7], [f"c{i}" for i in range(k)])["histogram"]
    assert hist == {"c0": round(2 / 7, 4), "c1": round(2 / 7, 4), "c2": round(1 / 7, 4), "c3": round(1 / 7, 4),
                    "c4": round(1 / 7, 4)}


# --------------------------------------------------------------------------------------------
# End to end: training writes it, sample uses it, 1 and 2 processes agree
# --------------------------------------------------------------------------------------------

TINY_ARGS = ["model.channels=[8,16]", "model.latent_channels=2", "data.batch_size_per_device=16",
             "data.num_workers=0", "data.val_batch_size_per_device=8", "tracking.log_every_steps=4",
             "tracking.media_every_steps=6", "tracking.eval_every_steps=6", "train.checkpoint_every_steps=12",
             "train.max_steps=12", "optim.warmup_steps=3", "loss.kl.warmup_steps=4", "tracking.mode=disabled",
             "prior.components=3", "prior.train_samples=40"]


def train(shards: Path, run_dir: Path, *extra: str) -> Path:
    args = ["recipes/demo.yaml", f"data.shards={shards}", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
            *TINY_ARGS, *extra]
    r = subprocess.run([sys.executable, "pipeline/train.py", *args], cwd=ROOT, env=TEST_ENV, capture_output=True,
                       text=True, timeout=300)
    assert (run_dir / "summary.json").exists(), r.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def runs(tiny_shards, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("expost")
    return {"with": train(tiny_shards, root / "with"), "without": train(tiny_shards, root / "without",
                                                                        "prior.components=0")}


def losses(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith(("loss/", "val/", "step"))} for r in rows]


@pytest.mark.slow
def test_training_fits_and_saves_the_prior_at_media_steps_without_changing_training(runs):
    with_prior, without = runs["with"], runs["without"]
    prior = ExpostPrior.load(with_prior / FILE_NAME)
    assert prior.meta["step"] == 12 and prior.meta["weights"] == "ema" and prior.meta["samples"] == 40
    assert prior.components == 3 and prior.covariance == "full" and prior.latent_shape == (2, 8, 8)
    assert sorted(p.name for p in (with_prior / "media").glob("expost-*.png")) == ["expost-000006.png",
                                                                                    "expost-000012.png"]
    assert not (without / FILE_NAME).exists() and not list((without / "media").glob("expost-*"))
    # The fit only reads the model: every loss and validation figure (PSNR included) is the same bit for bit.
    assert losses(with_prior) == losses(without)
    assert any("val/psnr" in r for r in losses(with_prior))


@pytest.mark.slow
def test_sample_prior_draws_from_the_ex_post_prior_by_default(runs, tmp_path, capsys):
    run_dir = runs["with"]
    run = load_run(run_dir, device="cpu")
    prior = ExpostPrior.load(run_dir / FILE_NAME)
    sample.main([str(run_dir), "prior", "--n", "4", "--separate", "--out", str(tmp_path / "p.png"), "--seed", "3"])
    assert "sampling the ex-post prior" in capsys.readouterr().out
    expected = media.to_uint8(run.model.decode(prior.sample(4, torch.Generator().manual_seed(3))),
                              run.model.output_range)
    got = np.stack([np.asarray(Image.open(tmp_path / "p" / f"{i:04d}.png").convert("RGB")) for i in range(4)])
    assert np.abs(got.astype(int) - expected).max() <= 1

    sample.main([str(run_dir), "prior", "--n", "4", "--separate", "--out", str(tmp_path / "n.png"), "--seed", "3",
                 "--prior", "normal"])
    normal = media.to_uint8(run.model.sample(4, 1.0, generator=torch.Generator().manual_seed(3)),
                            run.model.output_range)
    assert np.abs(np.asarray(Image.open(tmp_path / "n" / "0000.png").convert("RGB")).astype(int) - normal[0]).max() <= 1

    # A run without one: the default falls back to N(0, I) with a note; asking for expost is one sentence.
    sample.main([str(runs["without"]), "prior", "--n", "2", "--out", str(tmp_path / "w.png")])
    assert "note: sampling N(0, I)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        sample.main([str(runs["without"]), "prior", "--n", "2", "--out", str(tmp_path / "x.png"), "--prior", "expost"])
    assert e.value.code == 2 and "python -m pipeline.prior" in capsys.readouterr().err


def fit_cmd(nproc: int, run_dir: Path, out: Path) -> list[str]:
    args = ["-m", "pipeline.prior", str(run_dir), "--out", str(out), "prior.components=4", "prior.train_samples=50"]
    if nproc == 1:
        return [sys.executable, *args]
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", *args]


@pytest.mark.slow
def test_the_fit_is_the_same_file_on_one_and_two_processes(runs, tmp_path):
    """The 50 posterior means are read by every rank in the same batches (8 a batch: 7 batches, the last
    one short), encoded by alternate ranks, summed over ranks and fitted by the main process."""
    files = {}
    for nproc in (1, 2):
        out = tmp_path / f"{nproc}.safetensors"
        r = subprocess.run(fit_cmd(nproc, runs["with"], out), cwd=ROOT, env=TEST_ENV, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        files[nproc] = out.read_bytes()
    assert files[1] == files[2]
    prior = ExpostPrior.load(tmp_path / "2.safetensors")
    assert prior.meta["samples"] == 50 and prior.meta["step"] == 12 and prior.components == 4


@pytest.mark.slow
def test_the_score_has_the_decoders_ceiling_beside_the_val_images(runs, tiny_shards, tmp_path, capsys):
    """`--score` classifies the val images' reconstructions decode(mu) too: no prior's samples can look more like
    the classes than what this decoder makes of the images themselves (a blurred decode can read as one class)."""
    from pipeline.inference import split_batches
    from pipeline.sample_score import class_probabilities, load_classifier

    cls = tmp_path / "cls.safetensors"
    r = subprocess.run([sys.executable, "-m", "pipeline.classifier", "recipes/demo.yaml", f"data.shards={tiny_shards}",
                        "data.num_workers=0", "loss.perceptual.backbone=resnet10t", "--steps", "2", "--batch-size", "8",
                        "--out", str(cls)], cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sample.main([str(runs["with"]), "prior", "--n", "4", "--out", str(tmp_path / "p.png"), "--score", str(cls),
                 "--score-samples", "6"])
    assert "val decode(mu)" in capsys.readouterr().out
    scores = json.loads((tmp_path / "p-score.json").read_text())
    assert set(scores) >= {"val", "reconstructions", "normal", "expost"}

    run = load_run(runs["with"], device="cpu")
    classifier, classes = load_classifier(cls)
    val = torch.cat([b.images for b in split_batches(run.cfg, run.cfg.data.shards, "val", num_workers=0)])[:6]
    with torch.no_grad():
        recon = media.to_uint8(run.model.decode(run.model.encode(run.to_model_range(val))[0]), run.model.output_range)
    expected = summarize(class_probabilities(classifier, torch.from_numpy(recon).permute(0, 3, 1, 2)), classes)
    assert scores["reconstructions"]["count"] == 6
    assert scores["reconstructions"]["score"] == pytest.approx(expected["score"], rel=1e-9)
    assert scores["reconstructions"]["mean_max_probability"] == pytest.approx(expected["mean_max_probability"], rel=1e-9)
    assert scores["reconstructions"]["mean_max_probability"] != scores["val"]["mean_max_probability"]
