"""Encoding a dataset into latent shards (pipeline/encode.py), tiled inference (pipeline/tiling.py) and the
decode mode: the output does not depend on the number of processes, a killed or stopped encode resumed with
the same command equals an uninterrupted one, tiles blend without seams, and decode inverts encode exactly
as `reconstruct` does."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TEST_ENV, free_port
from processes import Launch
from PIL import Image

from pipeline import media, sample, tiling
from pipeline.config import ModelConfig
from pipeline.data import val_batches
from pipeline.inference import key_seed, load_images, load_run
from pipeline.models import build_model

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
UNITS = 4  # the tiny shards: train-000000..2 (32, 32, 22 samples) and val-000000 (10)


def train_spatial_run(shards: Path) -> Path:
    """A tiny resnet with a spatial latent (2 x 16 x 16 at 32 px, f = 2, attention at the lowest level),
    trained a few steps; kept next to the shards for the session."""
    run_dir = shards.parent.parent / "runs" / "spatial"
    if (run_dir / "summary.json").exists():
        return run_dir
    args = ["recipes/demo.yaml", f"data.shards={shards}", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
            "model.arch=resnet", "model.channels=[8,16]", "model.latent=spatial", "model.latent_channels=2",
            "model.attention_levels=[1]", "data.batch_size_per_device=16", "data.num_workers=0",
            "data.val_batch_size_per_device=8", "tracking.log_every_steps=50", "tracking.media_every_steps=1000",
            "tracking.eval_every_steps=1000", "train.checkpoint_every_steps=15", "train.max_steps=15",
            "optim.warmup_steps=3", "tracking.mode=disabled"]
    r = subprocess.run([sys.executable, "pipeline/train.py", *args], cwd=ROOT, env=TEST_ENV, capture_output=True,
                       text=True, timeout=300)
    assert (run_dir / "summary.json").exists(), r.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def spatial_run(tiny_shards) -> Path:
    return train_spatial_run(tiny_shards)


@pytest.fixture(scope="module")
def run(spatial_run):
    return load_run(spatial_run, device="cpu")


def encode_args(run_dir: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return [str(run_dir), "encode", str(shards), "--format", "shards", "--out", str(out), "--store", "mu,z",
            "--batch-size", "8", *extra]


def encode_cmd(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "pipeline.sample", *args]
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "pipeline.sample", *args]


@pytest.fixture(scope="module")
def reference(spatial_run, tiny_shards, tmp_path_factory) -> Path:
    """The uninterrupted encode: one process, no data workers. In a subprocess with the environment of the
    others (one OMP thread): CPU kernels may round differently with another thread count."""
    out = tmp_path_factory.mktemp("reference") / "latents"
    r = subprocess.run(encode_cmd(1, encode_args(spatial_run, tiny_shards, out, "--num-workers", "0")), cwd=ROOT,
                       env=TEST_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def output_bytes(out: Path) -> dict[str, bytes]:
    """The latent shards and manifest.json by name (what must not depend on how the encode ran)."""
    return {p.name: p.read_bytes() for p in sorted([*out.glob("*-[0-9]*.tar"), out / "manifest.json"])}


def read_latents(tar: Path) -> dict[str, dict]:
    """key -> {member: array or parsed JSON}, read with tarfile and np.load(allow_pickle=False)."""
    out: dict[str, dict] = {}
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            key, _, ext = m.name.partition(".")
            data = t.extractfile(m).read()
            out.setdefault(key, {})[ext] = (np.load(io.BytesIO(data), allow_pickle=False) if ext.endswith(".npy")
                                            else json.loads(data) if ext == "json" else int(data))
    return out


# --------------------------------------------------------------------------------------------
# What an encode writes, on 1 and 2 processes
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_latent_shards_hold_every_sample_once_with_its_mu_z_label_and_exact_statistics(reference, run, tiny_shards):
    manifest = json.loads((reference / "manifest.json").read_text())
    source = json.loads((tiny_shards / "manifest.json").read_text())
    assert [s["file"] for s in manifest["splits"]["train"]["shards"]] == ["train-000000.tar", "train-000001.tar",
                                                                         "train-000002.tar"]
    for split in ("train", "val"):
        assert manifest["splits"][split]["count"] == source["splits"][split]["count"]
    assert manifest["latent_shape"] == [2, 16, 16] and manifest["latent_dtype"] == "float32"
    assert manifest["members"] == ["mu.npy", "z.npy", "cls", "json"] and manifest["stats_of"] == "z"
    assert manifest["checkpoint"] == "step-000015" and manifest["run_dir"] == str(run.run_dir.resolve())

    samples = {}
    for shard in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        got = read_latents(reference / shard["file"])
        assert len(got) == shard["count"]
        samples.update(got)
    assert len(samples) == sum(s["count"] for s in source["splits"].values())
    # mu is the model's posterior mean of the image as training reads it; z = mu + sigma * eps(key).
    batch = next(val_batches(run.cfg, 0, 1, num_workers=0))
    mu, logvar = run.model.encode(run.to_model_range(batch.images))
    eps = torch.stack([torch.randn((2, 16, 16), generator=torch.Generator().manual_seed(key_seed(k, 0)))
                       for k in batch.keys])
    for i, key in enumerate(batch.keys):
        assert np.allclose(samples[key]["mu.npy"], mu[i].numpy(), atol=1e-5)
        assert np.allclose(samples[key]["z.npy"], (mu[i] + eps[i] * torch.exp(0.5 * logvar[i])).numpy(), atol=1e-5)
        assert samples[key]["json"]["label"] == int(batch.labels[i]) == samples[key]["cls"]
        assert samples[key]["json"]["class"] == run.classes[int(batch.labels[i])]
    # The statistics: per channel over every stored value of z, in float64.
    z = np.stack([s["z.npy"] for s in samples.values()]).astype(np.float64)
    assert np.allclose(manifest["channel_mean"], z.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(manifest["channel_std"], z.std(axis=(0, 2, 3)), rtol=0, atol=1e-9)
    assert manifest["scaling_factor"] == pytest.approx(1 / z.std(), rel=1e-9)


@pytest.mark.slow
def test_two_processes_write_byte_identical_shards_and_manifest(reference, spatial_run, tiny_shards, tmp_path):
    out = tmp_path / "latents"  # the same folder name as the reference's: the manifest names it
    r = subprocess.run(encode_cmd(2, encode_args(spatial_run, tiny_shards, out, "--num-workers", "1")), cwd=ROOT,
                       env=TEST_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"encoding {UNITS} of {UNITS} units on 2 processes" in r.stdout  # one gloo group of two
    assert re.search(r"rank 1: encoded \d+ images in 2 units", r.stdout), r.stdout
    assert output_bytes(out) == output_bytes(reference)


# --------------------------------------------------------------------------------------------
# Resume: SIGKILL, SIGTERM, the same command again
# --------------------------------------------------------------------------------------------


def writer_pids(out: Path) -> dict[str, int]:
    return {p.name: json.loads(p.read_text())["writer"]["pid"] for p in sorted(out.glob("*-[0-9]*.json"))}


@pytest.mark.slow
def test_killed_then_stopped_encode_resumed_with_the_same_command_equals_an_uninterrupted_one(
        reference, spatial_run, tiny_shards, tmp_path, capsys):
    out = tmp_path / "latents"
    cmd = encode_cmd(1, encode_args(spatial_run, tiny_shards, out, "--num-workers", "2"))

    # 1. SIGKILL right after the second unit was committed (the other worker's unit half written):
    #    every process of the tree dies, nothing looks complete.
    first = Launch(cmd, {**TEST_ENV, "VAE_KILL_AT": "encode-unit@2"}, ROOT)
    assert first.wait(120) == -signal.SIGKILL, first.output()[-3000:]
    first.kill_all()
    assert first.survivors() == []
    assert not (out / "manifest.json").exists()
    done = writer_pids(out)
    assert len(done) == 2 and set(done.values()) == {first.proc.pid}
    kept = {name: os.stat(out / name.replace(".json", ".tar")) for name in done}

    # 2. The same command, stopped by SIGTERM after its first unit: exit 75, its unit kept.
    second = Launch(cmd, {**TEST_ENV, "VAE_PAUSE_AT": "encode-unit@1:3"}, ROOT)
    second.wait_until(lambda: len(writer_pids(out)) == 3, 120, "the second start's first unit")
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait(60) == 75, second.output()[-3000:]
    assert "encoding 2 of 4 units on 1 processes (2 already complete, sha256 verified)" in second.output()
    assert "received SIGTERM" in second.output() and not (out / "manifest.json").exists()
    assert not list(out.glob(".*.tmp-*"))  # the unfinished unit was dropped, not left half written

    # 3. A finished unit damaged meanwhile is found by its sha256 and encoded again; then the same command
    #    finishes the rest and the output is the uninterrupted one's, byte for byte.
    damaged = sorted(done)[0].replace(".json", ".tar")
    data = bytearray((out / damaged).read_bytes())
    data[2000] ^= 0xFF
    (out / damaged).write_bytes(bytes(data))
    third = subprocess.run(cmd, cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "encoding 2 of 4 units on 1 processes (2 already complete, sha256 verified)" in third.stdout
    assert output_bytes(out) == output_bytes(reference)
    pids = writer_pids(out)
    untouched = sorted(done)[1]
    assert pids[untouched] == first.proc.pid  # kept from the first start, not rewritten
    assert os.stat(out / untouched.replace(".json", ".tar")).st_ino == kept[untouched].st_ino
    assert pids[sorted(done)[0]] not in (first.proc.pid, second.proc.pid)  # the damaged one: redone now
    assert sum(p == second.proc.pid for p in pids.values()) == 1

    # Once complete, the same command has nothing to do; another option is refused with one sentence
    # (in this process: neither encodes anything).
    before = output_bytes(out)
    args = cmd[3:]  # after `python -m pipeline.sample`
    sample.main(args)
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        sample.main(args[:-4] + ["--dtype", "fp16"] + args[-4:])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out} holds an encoding with dtype=fp32 (this command: fp16); run the command that made it to "
        f"continue it, pass --force to start it over, or choose another --out"]
    assert output_bytes(out) == before


# --------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, tile, overlap, align, starts", [
    (32, 32, 8, 2, [0]),
    (64, 32, 0, 2, [0, 32]),
    (64, 32, 8, 2, [0, 16, 32]),
    (100, 32, 8, 2, [0, 22, 46, 68]),
    (128, 64, 16, 4, [0, 32, 64]),
])
def test_tile_starts_cover_the_axis_with_full_tiles_and_at_least_the_overlap(length, tile, overlap, align, starts):
    got = tiling.tile_starts(length, tile, overlap, align)
    assert got == starts
    assert got[0] == 0 and got[-1] + tile == max(length, tile) and all(s % align == 0 for s in got)
    assert all(b - a <= tile - overlap for a, b in zip(got, got[1:]))


def local_model() -> torch.nn.Module:
    """dcgan with a spatial latent (f = 4): convolutions and eval-mode BatchNorm only, so a pixel depends on
    a bounded neighbourhood and a tile's interior must equal the whole image's exactly. PyTorch's default
    init (the dcgan init's N(0, 0.02) weights give a nearly constant output)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="dcgan", channels=[8, 16], latent="spatial", latent_channels=2), 32).eval()
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.reset_parameters()
    return model


def seam_step(tiled: torch.Tensor, whole: torch.Tensor, at: list[int] | None = None) -> float:
    """The largest jump, between neighbouring columns or rows, of the difference to the untiled output,
    averaged along the line (a hard seam shows up as one; content does not, it is in both): over every
    line, or only across the lines at pixel offsets `at` (between at - 1 and at)."""
    d = tiled - whole
    cols = (d[..., :, 1:] - d[..., :, :-1]).abs().mean(dim=(1, 2))  # [B, W - 1]: jump into column j + 1
    rows = (d[..., 1:, :] - d[..., :-1, :]).abs().mean(dim=(1, 3))
    if at is not None:
        cols, rows = cols[:, [a - 1 for a in at]], rows[:, [a - 1 for a in at]]
    return float(torch.cat([cols, rows], 1).max())


@torch.no_grad()
def test_tiled_reconstruction_matches_the_untiled_one_away_from_seams_without_a_seam_step():
    model = local_model()
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.avg_pool2d(torch.rand((1, 3, 128, 128), generator=g) * 2 - 1, 5, 1, 2)  # 4 tiles of 64 px
    whole = model.decode(model.encode(x)[0])
    steps = {}
    for overlap in (0, 16):
        mu, _ = tiling.tiled_encode(model, x, 64, overlap)
        tiled = tiling.tiled_decode(model, mu, 64, overlap)
        steps[overlap] = seam_step(tiled, whole)
        # Away from the seams (here: the first tile's corner, 24 px from any other tile) it is the untiled output.
        assert torch.allclose(tiled[..., :24, :24], whole[..., :24, :24], atol=1e-6, rtol=0)
        assert (tiled - whole).abs().max() < 5e-3  # and near them the tiles differ only by the border effect
    # Hard tiles (overlap 0) step at the seam; blended ones do not.
    assert steps[0] > 5e-4
    assert steps[16] < 2e-4, steps


@pytest.mark.slow
@torch.no_grad()
def test_trained_resnet_tiles_blend_and_one_tile_is_exactly_the_untiled_model(run, tiny_shards, tmp_path):
    images = sorted((tiny_shards.parent.parent / "images").rglob("*.jpg"))[:1]
    x32 = run.to_model_range(load_images(images, 32))
    untiled = run.model.decode(run.model.encode(x32)[0])
    assert torch.equal(sample.reconstruction(run, x32, 32, 8), untiled)
    x = run.to_model_range(load_images(images, 96))  # 3 x 3 training-size tiles of a natural image
    whole = run.model.decode(run.model.encode(x)[0])  # fully convolutional: the model on the whole image
    hard, blended = sample.reconstruction(run, x, 32, 0), sample.reconstruction(run, x, 32, 8)
    # GroupNorm and attention see one tile, so every tile differs from the whole image a little: hard tiles
    # step where they meet (measured 0.30-0.41 here); across the same lines the blended ones do not (the noise
    # of that difference is ~0.05 per line).
    starts = tiling.tile_starts(96, 32, 8, 2)  # [0, 22, 42, 64]: every line where a blended tile starts or ends
    edges = sorted({s for s in starts[1:]} | {s + 32 for s in starts[:-1]})
    assert seam_step(blended, whole, edges) < 0.5 * seam_step(hard, whole, [32, 64])

    # `reconstruct --native-size`: the image at its own size beside its tiled reconstruction.
    u8 = load_images(images, 96)
    Image.fromarray(u8[0].permute(1, 2, 0).numpy()).save(tmp_path / "big.png")
    sample.main([str(run.run_dir), "reconstruct", str(tmp_path / "big.png"), "--native-size", "--tile-overlap", "8",
                 "--out", str(tmp_path / "recon"), "--device", "cpu"])
    pair = np.asarray(Image.open(tmp_path / "recon" / "big.png"))
    assert pair.shape == (96, 192, 3) and np.array_equal(pair[:, :96], u8[0].permute(1, 2, 0).numpy())
    assert np.abs(pair[:, 96:].astype(int) - media.to_uint8(blended, run.model.output_range)[0]).max() <= 1


# --------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_decode_of_encoded_latents_reproduces_reconstruct(reference, run, spatial_run, tiny_shards, tmp_path):
    out = tmp_path / "decoded"
    sample.main([str(spatial_run), "decode", str(reference), "--format", "npy", "--out", str(out), "--device", "cpu"])
    assert len(list(out.glob("*.npy"))) == 96
    batch = next(val_batches(run.cfg, 0, 1, num_workers=0))
    recon = sample.reconstruction(run, run.to_model_range(batch.images))
    low, high = run.model.output_range
    expected = (recon - low) / (high - low)
    for i, key in enumerate(batch.keys):
        got = np.load(out / f"{key}.npy", allow_pickle=False)
        assert np.abs(got - expected[i].permute(1, 2, 0).numpy()).max() < 1e-5

    # PNGs: the same pixels `reconstruct` shows beside its input; a .npy file of one latent decodes too.
    mu = read_latents(reference / "val-000000.tar")[batch.keys[0]]["mu.npy"]
    np.save(tmp_path / "one.npy", mu)
    sample.main([str(spatial_run), "decode", str(tmp_path / "one.npy"), "--out", str(tmp_path / "png"),
                 "--device", "cpu"])
    png = np.asarray(Image.open(tmp_path / "png" / "one.png"))
    assert np.abs(png.astype(int) - media.to_uint8(recon[:1], run.model.output_range)[0]).max() <= 1

    # bf16 latents: stored as their uint16 bit pattern, read back by decode.
    sample.main([str(spatial_run), "encode", str(tiny_shards), "--format", "shards", "--out", str(tmp_path / "bf16"),
                 "--split", "val", "--dtype", "bf16", "--device", "cpu", "--num-workers", "0"])
    assert json.loads((tmp_path / "bf16" / "manifest.json").read_text())["latent_dtype"] == "bfloat16"
    stored = read_latents(tmp_path / "bf16" / "val-000000.tar")[batch.keys[0]]["mu.npy"]
    assert stored.dtype == np.uint16
    as_float = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.allclose(as_float, mu, rtol=2**-8, atol=1e-6)
    sample.main([str(spatial_run), "decode", str(tmp_path / "bf16"), "--format", "npy", "--out",
                 str(tmp_path / "bf16-decoded"), "--device", "cpu"])
    got = np.load(tmp_path / "bf16-decoded" / f"{batch.keys[0]}.npy", allow_pickle=False)
    assert np.abs(got - expected[0].permute(1, 2, 0).numpy()).max() < 0.05


@pytest.mark.slow
def test_tiled_encode_of_larger_shards_then_decode_equals_tiled_reconstruct(run, spatial_run, tiny_shards, tmp_path):
    big = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "pipeline.shards", str(tiny_shards.parent.parent / "images"), "--name",
                    "big", "--size", "64", "--out", str(big), "--workers", "1"], check=True, cwd=ROOT, env=TEST_ENV,
                   capture_output=True)
    out = tmp_path / "latents"
    sample.main([str(spatial_run), "encode", str(big / "big"), "--format", "shards", "--out", str(out), "--split",
                 "val", "--tile-overlap", "8", "--device", "cpu", "--num-workers", "0"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["latent_shape"] == [2, 32, 32] and manifest["image_size"] == 64
    sample.main([str(spatial_run), "decode", str(out), "--format", "npy", "--out", str(tmp_path / "decoded"),
                 "--device", "cpu"])
    cfg = copy.deepcopy(run.cfg)
    cfg.data.shards = str(big / "big")
    batch = next(val_batches(cfg, 0, 1, num_workers=0))
    recon = sample.reconstruction(run, run.to_model_range(batch.images), 32, 8)
    low, high = run.model.output_range
    for i, key in enumerate(batch.keys):
        got = np.load(tmp_path / "decoded" / f"{key}.npy", allow_pickle=False)
        expected = (recon[i].permute(1, 2, 0).numpy() - low) / (high - low)
        assert got.shape == (64, 64, 3) and np.abs(got - expected).max() < 1e-5


# --------------------------------------------------------------------------------------------
# SLURM
# --------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_encode_sbatch_on_two_nodes_requeues_on_usr1_and_finishes_identically(
        cluster, reference, spatial_run, tiny_shards, tmp_path):
    out = tmp_path / "latents"
    env = {k: v for k, v in TEST_ENV.items() if k not in ("ACCELERATE_USE_CPU", "OMP_NUM_THREADS")}
    env.update({"VIRTUAL_ENV": sys.prefix, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "VAE_PAUSE_AT": "encode-unit@1:4"})  # each rank pauses after its first unit: the signal finds work
    run_dir, _, *rest = encode_args(spatial_run, tiny_shards, out, "--num-workers", "1")  # without the mode
    job = cluster.sbatch(["--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out",
                          "slurm/encode.sbatch", run_dir, *rest], cwd=ROOT, env=env)
    log = out / f"slurm-{job}.log"
    deadline = time.monotonic() + 150
    while len(list(out.glob("*-[0-9]*.json"))) < 1:
        assert time.monotonic() < deadline and cluster.squeue(job), log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    cluster.scancel("--batch", "--signal=USR1", job)
    cluster.wait_done(job, timeout_s=240)
    text = log.read_text()
    assert (out / "manifest.json").exists(), text[-4000:]
    assert re.search(r"Restarts=1\b", cluster.scontrol("show", "job", job)), text[-3000:]
    assert "SLURM_RESTART_COUNT=0 nodes=" in text and "SLURM_RESTART_COUNT=1 nodes=" in text
    assert "processes=2 (1 per node, 0 GPUs)" in text and "received SIGUSR1" in text
    resumed = re.search(r"encoding (\d) of 4 units on 2 processes \((\d) already complete", text)
    assert resumed and int(resumed.group(2)) >= 1, text[-3000:]
    assert output_bytes(out) == output_bytes(reference)


@pytest.mark.slow  # seconds: in make test, not in make test-fast
def test_an_output_folder_held_by_a_live_encode_is_refused_with_one_sentence(spatial_run, tiny_shards, tmp_path):
    """Two launches never write one folder: while another process holds out/.lock, an encode into it exits 2
    with one sentence and writes nothing there."""
    out = tmp_path / "latents"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from pipeline.runs import RunLock; lock = RunLock(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(120)", str(out)],
                              cwd=ROOT, env=TEST_ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run(encode_cmd(1, encode_args(spatial_run, tiny_shards, out)), cwd=ROOT, env=TEST_ENV,
                           capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {out} is being written by another encode that is still running (its holder is named in "
        f"{out / '.lock'}); wait for it to finish or choose another --out")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# --------------------------------------------------------------------------------------------
# Names read from shards stay inside their folder
# --------------------------------------------------------------------------------------------


def test_a_sample_key_that_leaves_the_folder_never_becomes_a_member_name(tmp_path):
    """encode writes `<key>.mu.npy` members: a source key `../x` would make a member that tar -x writes
    outside the folder it extracts into."""
    from pipeline.errors import UserError
    from pipeline.encode import Unit, _UnitWriter

    unit = Unit(0, "train", "train-000000.tar", str(tmp_path / "src.tar"), "tiny:train-000000.tar", 2, "jpg")
    writer = _UnitWriter(tmp_path, unit, channels=1)
    z = np.zeros((2, 1, 2, 2), np.float32)
    try:
        with pytest.raises(UserError, match=r"src.tar holds a sample key '\.\./x' that would name a file outside"):
            writer.add(["ok", "../x"], {"mu": z}, [0, 0], ["a"], z.astype(np.float64))
    finally:
        writer.abort()


def _latent_shards(folder: Path, member_name: str, file: str = "train-000000.tar") -> Path:
    folder.mkdir()
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 2, 2), np.float32), allow_pickle=False)
    with tarfile.open(folder / "train-000000.tar", "w") as tar:
        info = tarfile.TarInfo(member_name)
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    (folder / "manifest.json").write_text(json.dumps({"kind": "latents", "members": ["mu.npy"],
                                                      "splits": {"train": {"shards": [{"file": file}]}}}))
    return folder


@pytest.mark.parametrize("member,file", [("/tmp/evil.mu.npy", "train-000000.tar"),  # key "/tmp/evil"
                                         ("good.mu.npy", "../train-000000.tar")])
def test_decode_refuses_latent_shard_names_that_leave_their_folder(tmp_path, member, file):
    from pipeline.errors import UserError

    folder = _latent_shards(tmp_path / "latents", member, file)
    if file.startswith(".."):
        (tmp_path / "train-000000.tar").write_bytes((folder / "train-000000.tar").read_bytes())
    with pytest.raises(UserError, match=r"(sample key '/tmp/evil'|names '\.\./train-000000.tar').* outside"):
        list(sample._shard_latents(folder, "mu"))
