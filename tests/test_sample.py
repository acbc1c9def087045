"""The sample tools on a trained model: every mode writes what it says, encode round-trips, anomaly ranks
images from another distribution first, and nothing is overwritten without --force."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TEST_ENV
from pipeline import media, sample
from pipeline.data import val_batches
from pipeline.inference import load_images, load_run
from test_evaluate import train_tiny_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_shards) -> Path:
    return train_tiny_run(tiny_shards)


@pytest.fixture(scope="module")
def run(trained):
    return load_run(trained, device="cpu")


def shard_samples(shards: Path, split: str) -> dict[str, int]:
    """key -> label, read straight from the tar files (not through the pipeline's reader)."""
    out = {}
    for tar in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, _, ext = m.name.partition(".")
                if ext == "cls":
                    out[key] = int(t.extractfile(m).read())
                else:
                    out.setdefault(key, -1)
    return out


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def flower_files(tiny_shards, tmp_path_factory) -> list[Path]:
    """Two source images of the demo set (full size: the tools resize them like `make shards`)."""
    images = tiny_shards.parent.parent / "images"
    return sorted(images.rglob("*.jpg"))[:2]


def test_prior_grid_separate_files_and_no_overwrite_without_force(run, trained, tmp_path, capsys):
    out = tmp_path / "prior.png"
    sample.main([str(trained), "prior", "--n", "6", "--separate", "--out", str(out), "--temperature", "0.7",
                 "--prior", "normal"])
    grid = png(out)
    assert grid.shape == (2 + 2 * (32 + 2), 2 + 3 * (32 + 2), 3)  # ceil(sqrt(6)) = 3 per row, 2 rows
    singles = sorted((tmp_path / "prior").glob("*.png"))
    assert [p.name for p in singles] == [f"{i:04d}.png" for i in range(6)]
    assert np.array_equal(png(singles[4]), grid[2 + 34:2 + 34 + 32, 2 + 34:2 + 34 + 32])
    g = torch.Generator().manual_seed(0)
    expected = media.to_uint8(run.model.sample(6, 0.7, generator=g), run.model.output_range)
    assert np.abs(png(singles[0]).astype(int) - expected[0]).max() <= 1

    before = out.read_bytes()
    with pytest.raises(SystemExit) as e:
        sample.main([str(trained), "prior", "--n", "4", "--out", str(out), "--seed", "1"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {out} exists; pass --force to overwrite it or choose another --out"
    assert out.read_bytes() == before
    sample.main([str(trained), "prior", "--n", "4", "--out", str(out), "--seed", "1", "--force"])
    assert out.read_bytes() != before


def test_reconstruct_puts_each_image_beside_decode_of_its_mean(run, trained, flower_files, tmp_path):
    out = tmp_path / "recon.png"
    sample.main([str(trained), "reconstruct", *map(str, flower_files), "--out", str(out)])
    grid = png(out)
    assert grid.shape == (2 + 34, 2 + 4 * 34, 3)  # one row: input, recon, input, recon
    x = load_images(flower_files, 32)
    mu, _ = run.model.encode(run.to_model_range(x))
    recon = media.to_uint8(run.model.decode(mu), run.model.output_range)
    assert np.array_equal(grid[2:34, 2:34], x[0].permute(1, 2, 0).numpy())
    assert np.abs(grid[2:34, 36:68].astype(int) - recon[0]).max() <= 1
    assert np.abs(grid[2:34, 104:136].astype(int) - recon[1]).max() <= 1


def test_interpolate_writes_the_slerp_strip_and_a_looping_gif(run, trained, flower_files, tmp_path):
    out = tmp_path / "interp.png"
    sample.main([str(trained), "interpolate", str(flower_files[0]), str(flower_files[1]), "--steps", "5",
                 "--out", str(out)])
    x = run.to_model_range(load_images(flower_files, 32))
    expected = media.interpolation_strips(run.model, x[:1], x[1:2], steps=5)
    assert np.abs(png(out).astype(int) - expected).max() <= 1
    gif = Image.open(tmp_path / "interp.gif")
    assert gif.n_frames == 2 * 5 - 2 and gif.info.get("loop") == 0


def test_traverse_writes_one_grid_per_highest_kl_dim(run, trained, tmp_path, capsys):
    sample.main([str(trained), "traverse", "--dims", "2", "--rows", "3", "--out", str(tmp_path / "tr")])
    images = torch.cat([b.images for b in val_batches(run.cfg, 0, 1, num_workers=0)])[:64]
    mu, logvar = run.model.encode(run.to_model_range(images))
    dims = media.top_kl_dims(mu, logvar, 2)
    files = sorted((tmp_path / "tr").glob("dim-*.png"))
    assert [f.name for f in files] == sorted(f"dim-{d:04d}.png" for d in dims)
    assert png(files[0]).shape == (2 + 3 * 34, 2 + len(media.TRAVERSAL_VALUES) * 34, 3)
    assert f"dimensions (highest KL first): {dims[0]} " in capsys.readouterr().out


def test_encode_round_trip_keys_labels_and_decoded_mu(run, trained, tiny_shards, tmp_path):
    out = tmp_path / "latents"
    sample.main([str(trained), "encode", str(tiny_shards), "--out", str(out)])
    with open(out / "index.csv") as f:
        index = list(csv.DictReader(f))
    mu = np.load(out / "mu.npy", allow_pickle=False)
    logvar = np.load(out / "logvar.npy", allow_pickle=False)
    expected = {**shard_samples(tiny_shards, "train"), **shard_samples(tiny_shards, "val")}
    assert {r["key"]: int(r["label"]) for r in index} == expected
    assert len(index) == len(expected) == mu.shape[0] == logvar.shape[0] and mu.shape[1:] == (8,)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == len(index) and meta["latent_shape"] == [8]
    assert all(r["class"] == run.classes[int(r["label"])] for r in index)

    # decode(saved mu) is the model's reconstruction of the same images, read the way training reads them.
    row = {r["key"]: int(r["row"]) for r in index}
    batch = next(val_batches(run.cfg, 0, 1, num_workers=0))
    saved = torch.from_numpy(mu[[row[k] for k in batch.keys]])
    mu_now, logvar_now = run.model.encode(run.to_model_range(batch.images))
    assert torch.allclose(saved, mu_now, atol=1e-5)
    assert torch.allclose(torch.from_numpy(logvar[[row[k] for k in batch.keys]]), logvar_now, atol=1e-5)
    assert torch.allclose(run.model.decode(saved), run.model.decode(mu_now), atol=1e-5)

    # --format shards (pipeline.encode, tests/test_encode.py): the same numbers as plain .npy members (no
    # pickle), with key, label and JSON; one latent shard per source shard.
    sample.main([str(trained), "encode", str(tiny_shards), "--format", "shards", "--out", str(tmp_path / "wds"),
                 "--device", "cpu", "--num-workers", "0"])
    seen = {}
    for tar in sorted((tmp_path / "wds").glob("*-[0-9]*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, _, ext = m.name.partition(".")
                data = t.extractfile(m).read()
                if ext == "mu.npy":
                    seen[key] = np.load(io.BytesIO(data), allow_pickle=False)
                elif ext == "json":
                    assert json.loads(data)["label"] == expected[key]
    assert len(list((tmp_path / "wds").glob("*-[0-9]*.tar"))) == 4  # 3 train shards and 1 val shard
    assert seen.keys() == {r["key"] for r in index}
    for r in index:
        assert np.allclose(seen[r["key"]], mu[int(r["row"])], atol=1e-5)


def test_anomaly_ranks_noise_above_every_val_image(trained, tiny_shards, tmp_path):
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise"
    noise.mkdir()
    for i in range(3):  # another distribution: black/white noise, at a size the loader must resize and crop
        # (uniform noise at 48x40, smoothed by the 1.25x antialiased downscale, scored below the hardest
        # val image; at 34x36 black/white noise stays above it by 0.04-0.16 bits/dim over 5 seeds)
        Image.fromarray(rng.integers(0, 2, (34, 36, 3), dtype=np.uint8) * 255).save(noise / f"noise{i}.png")
    out = tmp_path / "scores.csv"
    sample.main([str(trained), "anomaly", str(tiny_shards), str(noise), "--out", str(out), "--top-k", "3",
                 "--samples", "4"])
    with open(out) as f:
        rows = list(csv.DictReader(f))
    val_count = json.loads((tiny_shards / "manifest.json").read_text())["splits"]["val"]["count"]
    assert len(rows) == val_count + 3
    assert {r["key"] for r in rows[:3]} == {"noise0", "noise1", "noise2"}
    scores = [float(r["neg_elbo_nats"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    # Noise reconstructs worse than the typical val image. (Not "than every val image": which images
    # are in val follows their content keys, and a hard one, a saturated blue trillium, does worse
    # than noise in MSE while still scoring a lower -ELBO than all three noise images.)
    val_mse = sorted(float(r["recon_mse"]) for r in rows[3:])
    assert min(float(r["recon_mse"]) for r in rows[:3]) > val_mse[len(val_mse) // 2]
    top = png(tmp_path / "scores-top3.png")
    assert top.shape == (2 + 34, 2 + 6 * 34, 3)


def test_cli_refuses_an_unreadable_image_and_a_missing_checkpoint_with_one_sentence(trained, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    cmd = [sys.executable, "-m", "pipeline.sample", str(trained)]
    r = subprocess.run(cmd + ["reconstruct", str(bad), "--out", str(tmp_path / "r.png")], cwd=ROOT, env=TEST_ENV,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: cannot read image {bad}: not a readable image (unknown format or corrupt header); "
        f"remove it or convert it to PNG/JPEG"]
    assert not (tmp_path / "r.png").exists()
    r = subprocess.run(cmd + ["prior", "--checkpoint", "step-999999"], cwd=ROOT, env=TEST_ENV, capture_output=True,
                       text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "checkpoint" in r.stderr and "step-999999 does not exist" in r.stderr
