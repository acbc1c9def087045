"""pipeline/tracking.py against real W&B offline runs, read back from the run-<id>.wandb log.

One offline run (scalars, media, eval, summary) is shared by most assertions: wandb init and
finish cost about a second each.
"""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from pipeline import wandb_log as wo
from pipeline.config import ConfigError, load_config, to_dict
from pipeline.tracking import METRICS_FILE, RUN_ID_FILE, Tracker, code_version, read_metrics
from test_media import TinyVAE

SIZE = 16
MEDIA_IMAGES, INTERP_STEPS, TRAVERSE_DIMS = 4, 8, 3
KINDS = ("recon", "samples", "interpolations", "traversals")


def make_cfg(mode="offline", **extra):
    overrides = [f"tracking.mode={mode}", "run.name=tiny", f"tracking.media_images={MEDIA_IMAGES}",
                 f"tracking.interpolation_steps={INTERP_STEPS}", f"tracking.traverse_dims={TRAVERSE_DIMS}",
                 "train.seed=7"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides, check_paths=False)


def val_batch(n=6):
    """A fixed uint8 validation batch like data.Batch.images: smooth colour ramps."""
    ramp = torch.linspace(0, 255, SIZE)
    img = torch.stack([ramp[None, :].expand(SIZE, SIZE), ramp[:, None].expand(SIZE, SIZE),
                       torch.full((SIZE, SIZE), 90.0)])
    return torch.stack([img.roll(i * 3, dims=2) for i in range(n)]).to(torch.uint8)


def scalars(step):
    return {"loss/recon": 1.0 / step, "loss/kl": 0.25 * step, "loss/total": 1.0 / step + 0.25 * step,
            "train/lr": 1e-3 * step, "train/beta": 0.5, "train/grad_norm": 2.0 + step,
            "train/images_per_second": 100.0 * step}


EVAL = {"val/recon": 0.2, "val/kl_nats": 3.5, "val/psnr": 21.5, "val/active_units": 12, "count": 10,
        "kl_per_dim": torch.linspace(0.0, 3.0, 128).tolist(), "mu_variance_per_dim": [0.5] * 128}
EVAL_ROW = {"val/recon": 0.2, "val/kl_nats": 3.5, "val/psnr": 21.5, "val/active_units": 12, "val/count": 10}


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tracking") / "runs" / "tiny"
    cfg = make_cfg()
    torch.manual_seed(0)
    model = TinyVAE(latent="spatial", size=SIZE)  # 2 x 8 x 8 latent: traversal dims are flat indices
    tracker = Tracker(cfg, run_dir)
    tracker.log_model_info(model, flops_per_image=12345)
    for step in range(1, 5):
        tracker.log_scalars(step, scalars(step))
    paths = tracker.log_media(4, model, val_batch())
    tracker.log_eval(4, EVAL)  # what evaluate.validate returns: val/ scalars, a count, per-dim vectors
    last_scalars = dict(tracker.last_scalars)
    tracker.set_summary({"images_per_second": 321.0, "step": 4})
    wandb_dir = tracker.wandb_dir
    tracker.finish()
    tracker.finish()  # safe twice
    return SimpleNamespace(run_dir=run_dir, cfg=cfg, paths=paths, wandb_dir=wandb_dir, model=model,
                           last_scalars=last_scalars)


def test_offline_run_lives_in_the_run_folder(offline_run):
    files = wo.wandb_files(offline_run.run_dir)
    assert len(files) == 1 and files[0].parent == offline_run.wandb_dir
    assert files[0].parent.parent == offline_run.run_dir / "wandb"
    run_id = (offline_run.run_dir / RUN_ID_FILE).read_text().strip()
    assert wo.run_id(offline_run.run_dir) == run_id and files[0].name == f"run-{run_id}.wandb"
    (run,) = wo.run_records(offline_run.run_dir)
    assert run.display_name == "tiny" and run.project == offline_run.cfg.tracking.project
    assert wo.exit_codes(offline_run.run_dir) == [0]


def test_offline_run_history_has_every_loss_term(offline_run):
    rows = {}
    for row in wo.history(offline_run.run_dir):
        rows.setdefault(row["_step"], {}).update(row)
    assert sorted(rows) == [1, 2, 3, 4]
    for step in range(1, 5):
        for key, value in scalars(step).items():
            assert rows[step][key] == pytest.approx(value), (step, key)
    for key, value in EVAL_ROW.items():
        assert rows[4][key] == pytest.approx(value), key


def test_offline_run_config_is_the_resolved_recipe(offline_run):
    logged = wo.config(offline_run.run_dir)
    info = logged.pop("model_info")
    assert logged.pop("code") == code_version()  # the commit of this checkout and whether it is dirty
    assert logged == json.loads(json.dumps(to_dict(offline_run.cfg)))
    assert info == {"parameters": sum(p.numel() for p in offline_run.model.parameters()),
                    "latent_shape": [2, 8, 8], "output_range": [-1.0, 1.0], "training_flops_per_image": 12345}
    assert logged["tracking"]["media_images"] == MEDIA_IMAGES and logged["train"]["seed"] == 7


def test_offline_run_summary(offline_run):
    summary = wo.summary(offline_run.run_dir)
    assert summary["images_per_second"] == 321.0 and summary["step"] == 4
    assert summary["model/training_flops_per_image"] == 12345


def test_offline_run_media_are_the_non_black_pngs_of_the_run_folder(offline_run):
    logged = {key: (step, path) for key, step, path in wo.media(offline_run.run_dir)}
    assert set(logged) == {f"media/{k}" for k in KINDS} | {"val/kl_per_dim", "val/mu_variance_per_dim"}
    for kind in KINDS:
        step, path = logged[f"media/{kind}"]
        ours = offline_run.run_dir / "media" / f"{kind}-000004.png"
        assert step == 4 and path.is_file() and offline_run.paths[kind] == ours
        img = png(path)
        # the image W&B stored is pixel-for-pixel the uint8 grid we wrote (no float cast to black)
        assert np.array_equal(img, png(ours)), kind
        tiles = img[2:2 + SIZE, 2:2 + SIZE].astype(float)  # the first tile, inside the padding
        assert img.mean() > 20 and tiles.mean() > 20 and tiles.std() > 1, kind
    tile = SIZE + 2
    assert png(logged["media/recon"][1]).shape == (2 * tile + 2, MEDIA_IMAGES * tile + 2, 3)
    assert png(logged["media/interpolations"][1]).shape == (2 * tile + 2, INTERP_STEPS * tile + 2, 3)
    assert png(logged["media/traversals"][1]).shape[0] == TRAVERSE_DIMS * (tile + 2)
    recon = png(logged["media/recon"][1])
    assert recon[tile + 2:, :].std() > 1  # the reconstruction row is a picture too
    for name in ("kl_per_dim", "mu_variance_per_dim"):
        step, path = logged[f"val/{name}"]
        assert step == 4 and png(path).std() > 10
        assert np.array_equal(png(path), png(offline_run.run_dir / "media" / f"{name}-000004.png"))


def test_metrics_jsonl_has_one_line_per_call(offline_run):
    rows = read_metrics(offline_run.run_dir / METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4]
    for row, step in zip(rows[:4], range(1, 5)):
        assert row == {"step": step, **scalars(step)}
    assert rows[4] == {"step": 4, **EVAL_ROW}  # scalars only; vectors go to the charts
    assert offline_run.last_scalars == {**scalars(4), **EVAL_ROW}


def test_resume_continues_the_same_wandb_run(offline_run, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(offline_run.run_dir, run_dir)
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write('{"step": 5, "loss/re')  # a line torn by a killed process
    first_id = (run_dir / RUN_ID_FILE).read_text().strip()

    tracker = Tracker(make_cfg(), run_dir)
    for step in (5, 6):
        tracker.log_scalars(step, scalars(step))
    tracker.finish(75)  # EXIT_PREEMPTED: SIGUSR1/SIGTERM before a requeue

    assert (run_dir / RUN_ID_FILE).read_text().strip() == first_id
    runs = wo.run_records(run_dir)
    assert [r.run_id for r in runs] == [first_id, first_id] and runs[1].resume
    assert len(wo.wandb_files(run_dir)) == 2  # one offline-run folder per process start
    assert wo.exit_codes(run_dir) == [0, 75]
    second = wo.read_records(wo.wandb_files(run_dir)[1])
    assert any(r.WhichOneof("record_type") == "preempting" for r in second)
    steps = [row["_step"] for row in wo.history(run_dir)]
    assert steps == sorted(steps) and steps[-2:] == [5, 6] and max(steps[:-2]) == 4
    assert wo.history(run_dir)[-1]["loss/recon"] == pytest.approx(1 / 6)
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 4, 5, 6]  # torn fragment dropped


def test_disabled_mode_writes_metrics_and_pngs_but_no_wandb(tmp_path):
    run_dir = tmp_path / "tiny"
    tracker = Tracker(make_cfg(mode="disabled"), run_dir)
    tracker.log_scalars(1, scalars(1))
    model = TinyVAE(latent="vector", size=SIZE, output="sigmoid")
    paths = tracker.log_media(1, model, val_batch().float() / 255.0)  # float input in the output range
    tracker.log_eval(1, {"psnr": 20.0}, kl_per_dim=torch.tensor([0.5, 2.0, 0.0]))
    tracker.set_summary({"step": 1})
    tracker.finish()
    assert tracker.run is None and tracker.wandb_dir is None
    assert sorted(p.name for p in (run_dir / "media").iterdir()) == sorted(
        [f"{k}-000001.png" for k in KINDS] + ["kl_per_dim-000001.png"])
    assert all(png(p).std() > 1 for p in paths.values())
    assert read_metrics(run_dir / METRICS_FILE) == [{"step": 1, **scalars(1)}, {"step": 1, "eval/psnr": 20.0}]
    assert not (run_dir / "wandb").exists() and not (run_dir / RUN_ID_FILE).exists()


def test_other_ranks_do_nothing(tmp_path):
    rank1 = SimpleNamespace(is_main_process=False)  # what Accelerator reports off the main process
    tracker = Tracker(make_cfg(), tmp_path / "tiny", rank1)
    tracker.log_scalars(1, scalars(1))
    assert tracker.log_media(1, TinyVAE(size=SIZE), val_batch()) == {}
    tracker.log_eval(1, {"psnr": 1.0})
    tracker.set_summary({"a": 1})
    tracker.finish()
    assert not (tmp_path / "tiny").exists()


def test_fixed_noise_is_the_same_on_every_resume(tmp_path):
    cfg = make_cfg(mode="disabled")
    model = TinyVAE(latent="spatial", size=SIZE)
    a = Tracker(cfg, tmp_path / "a").fixed_noise(model)
    b = Tracker(cfg, tmp_path / "b").fixed_noise(model)
    assert a.shape == (MEDIA_IMAGES, *model.latent_shape) and torch.equal(a, b)


@pytest.mark.parametrize("kind, step, final, due", [
    ("scalars", 10, False, True), ("scalars", 11, False, False), ("media", 200, False, True),
    ("media", 100, False, False), ("eval", 500, False, True), ("eval", 7, True, True),
])
def test_is_due_follows_the_configured_cadence(kind, step, final, due):
    assert Tracker(make_cfg(), "unused", SimpleNamespace(is_main_process=False)).is_due(kind, step, final) is due


def test_online_without_credentials_is_one_sentence(tmp_path, monkeypatch):
    import wandb

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc or W&B settings from the machine
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    try:
        with pytest.raises(ConfigError, match="tracking.mode is online.*tracking.mode=offline"):
            Tracker(make_cfg(mode="online"), tmp_path / "tiny")
    finally:
        wandb.teardown()  # drop the settings wandb cached from this test's environment


# --- the reader itself (tests/wandb_offline.py) --------------------------------------------------

def test_reader_reassembles_records_across_32k_blocks(tmp_path):
    import wandb

    big = {f"key{i:04d}": "x" * 60 for i in range(1500)}  # one ~100 KB config record: FIRST, MIDDLE..., LAST
    run = wandb.init(mode="offline", dir=str(tmp_path), project="reader", id="blocks1", config=big,
                     settings=wandb.Settings(console="off", silent=True))
    for step in range(400):
        run.log({"x": float(step)}, step=step)
    run.finish()
    wandb.teardown()
    (path,) = wo.wandb_files(tmp_path)
    assert path.stat().st_size > 3 * wo.BLOCK_BYTES
    assert wo.config(tmp_path) == big
    assert [row["x"] for row in wo.history(tmp_path)] == [float(s) for s in range(400)]


def test_reader_stops_at_a_torn_tail_and_rejects_corruption(offline_run, tmp_path):
    (path,) = wo.wandb_files(offline_run.run_dir)
    data = path.read_bytes()
    full = wo.read_payloads(path)
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(data[:-3])  # killed mid-write: the last record is incomplete
    assert wo.read_payloads(torn) == full[:-1]
    bad = bytearray(data)
    bad[wo.HEADER.size + wo.CHUNK.size + 2] ^= 0xFF  # inside the first record's data
    (tmp_path / "bad.wandb").write_bytes(bytes(bad))
    with pytest.raises(wo.CorruptLog, match="checksum"):
        wo.read_payloads(tmp_path / "bad.wandb")
    (tmp_path / "not.wandb").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(wo.CorruptLog, match="not a W&B"):
        wo.read_payloads(tmp_path / "not.wandb")


def test_code_version_is_this_checkouts_commit_and_dirty_flag():
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    assert code_version() == {"commit": head, "dirty": bool(status)}
