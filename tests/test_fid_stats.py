"""rFID's cached reference statistics (pipeline.fid_stats), with a random-init Inception file made here: computed
once and then read (Inception does not run again, the file is not rewritten); other weights, protocol or shards
are not reused; a torn or garbled file is one line and recomputed; a shards folder that cannot be written falls
back to the cache folder; an evaluation with the reference gives the in-pass rFID and refuses other images;
1 and 2 processes write the same bytes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TEST_ENV, free_port
from pipeline import fid_stats, metrics
from pipeline.config import Config, ConfigError
from pipeline.inference import split_batches
from test_evaluate import ACCELERATE
from test_metrics import weights  # noqa: F401 (the fixture: random-init AlexNet and InceptionV3 files)

FEATURES = 64  # torch-fidelity's first feature layer: the cheapest, the protocol is the same

pytestmark = pytest.mark.slow  # InceptionV3 at 299 px on CPU: seconds per test; in make test, not test-fast


@pytest.fixture
def shards(tiny_shards, tmp_path) -> Path:
    """A private copy of the tiny shards (10 val images of 32 px): the cache is written into it."""
    return Path(shutil.copytree(tiny_shards, tmp_path / "tiny"))


@pytest.fixture(scope="module")
def inception(weights):  # noqa: F811
    return metrics.load_inception(str(weights["inception"]), "cpu", FEATURES)


def _cfg(shards: Path, weights_file: Path) -> Config:
    cfg = Config()
    cfg.data.shards, cfg.data.num_workers, cfg.data.val_batch_size_per_device = str(shards), 0, 4
    cfg.metrics.inception_weights, cfg.metrics.fid_features = str(weights_file), FEATURES
    return cfg


class Calls:
    """Counts the Inception forward passes (a hook on the real network) and collects the printed lines."""

    def __init__(self, inception):
        self.forwards, self.lines = 0, []
        self.handle = inception.register_forward_hook(lambda *args: setattr(self, "forwards", self.forwards + 1))

    def reference(self, cfg, inception) -> fid_stats.Reference:
        return fid_stats.reference(cfg, cfg.data.shards, "val", inception, None, self.lines.append)


@pytest.fixture
def calls(inception):
    c = Calls(inception)
    yield c
    c.handle.remove()


def _stat(path: Path) -> tuple[int, int]:
    s = path.stat()
    return s.st_ino, s.st_mtime_ns


def _same(a: fid_stats.Reference, b: fid_stats.Reference) -> bool:
    return (a.pixel_sum == b.pixel_sum and torch.equal(a.moments.n, b.moments.n)
            and torch.equal(a.moments.sum, b.moments.sum) and torch.equal(a.moments.outer, b.moments.outer))


def test_the_reference_is_computed_once_then_read_and_holds_every_val_image(shards, weights, inception,  # noqa: F811
                                                                           calls):
    cfg = _cfg(shards, weights["inception"])
    first = calls.reference(cfg, inception)
    assert first.path.parent == shards / "fid_stats" and first.path.is_file()
    assert "computed and written" in calls.lines[-1] and calls.forwards == 3  # 10 images in batches of 4
    before = _stat(first.path)

    second = calls.reference(cfg, inception)
    assert calls.forwards == 3, "Inception ran again although the cache was there"
    assert _stat(first.path) == before and second.path == first.path and f"from {first.path}" in calls.lines[-1]
    assert _same(first, second)

    # What it holds: every val image's features, as the in-pass accumulation computes them.
    manifest = json.loads((shards / "manifest.json").read_text())
    streamed, pixels = metrics.FeatureMoments(FEATURES), 0
    for batch in split_batches(cfg, shards, "val"):
        streamed.add(inception(batch.images)[0])
        pixels += int(batch.images.sum())
    assert int(second.moments.n) == manifest["splits"]["val"]["count"] == 10 and second.pixel_sum == pixels
    assert torch.allclose(second.moments.sum, streamed.sum, rtol=1e-12)
    assert torch.allclose(second.moments.outer, streamed.outer, rtol=1e-12)
    record = json.loads(__import__("safetensors").safe_open(str(first.path), "pt").metadata()["fid_reference"])
    assert record["inception_sha256"] == fid_stats.durable.sha256_file(weights["inception"])
    assert (record["split"], record["image_size"], record["feature_layer"], record["count"]) == ("val", 32, 64, 10)
    assert record["manifest_sha256"] == fid_stats.durable.sha256_file(shards / "manifest.json")
    assert "299x299" in record["protocol"] and "no crop" in record["protocol"]


def _other_weights(path: Path, tmp_path: Path) -> Path:
    state = torch.load(path, weights_only=True)
    name = next(k for k, v in state.items() if k.endswith("conv.weight"))
    state[name] = state[name] * 1.5
    out = tmp_path / "other-inception.pth"
    torch.save(state, out)
    return out


@pytest.mark.parametrize("change", ["weights", "protocol", "shards", "torch-fidelity"])
def test_a_cache_of_other_weights_protocol_or_shards_is_recomputed_not_reused(shards, weights, inception,  # noqa: F811
                                                                             calls, change, tmp_path, monkeypatch):
    cfg = _cfg(shards, weights["inception"])
    old = calls.reference(cfg, inception)
    forwards = calls.forwards
    if change == "weights":
        cfg.metrics.inception_weights = str(_other_weights(weights["inception"], tmp_path))
        ident = fid_stats.identity(shards, "val", cfg.metrics.inception_weights, FEATURES)
        new_path = fid_stats.locations(shards, ident)[0]
        shutil.copy(old.path, new_path)  # under the new weights' name: only the record can tell
        field = "inception_sha256"
        inception = metrics.load_inception(cfg.metrics.inception_weights, "cpu", FEATURES)
        calls.handle.remove()
        calls = Calls(inception)
        forwards = 0
    elif change == "protocol":
        monkeypatch.setattr(fid_stats, "PROTOCOL", fid_stats.PROTOCOL.replace("no crop", "a centre crop of 87.5%"))
        field = "protocol"
    elif change == "torch-fidelity":
        import torch_fidelity

        monkeypatch.setattr(torch_fidelity, "__version__", "0.5.0")
        field = "torch_fidelity"
    else:  # the same folder, other shards: a manifest that lists other content
        manifest = json.loads((shards / "manifest.json").read_text())
        manifest["options"]["quality"] = manifest["options"].get("quality", 90) - 1
        (shards / "manifest.json").write_text(json.dumps(manifest))
        field = "manifest_sha256"
    new = calls.reference(cfg, inception)
    assert calls.forwards > forwards, f"a cache of other {change} was reused"
    assert any("stale" in line and f"{field} differs" in line and "recomputing" in line for line in calls.lines), \
        calls.lines
    assert "computed and written" in calls.lines[-1]
    if change == "weights":
        assert not torch.equal(new.moments.outer, old.moments.outer) and new.path != old.path and old.path.is_file()
    again = calls.reference(cfg, inception)  # the recomputed file is of the new identity: read from now on
    assert f"from {new.path}" in calls.lines[-1] and _same(again, new)


@pytest.mark.parametrize("damage", ["truncated", "byte flipped in the statistics", "header overwritten"])
def test_a_torn_or_garbled_cache_file_is_one_line_and_recomputed(shards, weights, inception, calls,  # noqa: F811
                                                                 damage):
    cfg = _cfg(shards, weights["inception"])
    good = calls.reference(cfg, inception)
    data = bytearray(good.path.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "byte flipped in the statistics":
        data[-100] ^= 0x40
    else:
        data[8:40] = b"x" * 32
    good.path.write_bytes(bytes(data))
    forwards = calls.forwards
    again = calls.reference(cfg, inception)
    problems = [line for line in calls.lines if "recomputing" in line]
    assert len(problems) == 1 and str(good.path) in problems[0], calls.lines
    assert ("unreadable" in problems[0]) if damage != "byte flipped in the statistics" else ("garbled" in problems[0])
    assert calls.forwards > forwards and _same(again, good) and good.path.read_bytes() != bytes(data)


def test_a_shards_folder_that_cannot_be_written_falls_back_to_the_cache_folder(shards, weights, inception,  # noqa: F811
                                                                              calls, tmp_path, monkeypatch):
    monkeypatch.setenv(fid_stats.CACHE_ENV, str(tmp_path / "cache"))
    (shards / "fid_stats").write_text("")  # a file where the folder would go: writing there fails
    cfg = _cfg(shards, weights["inception"])
    first = calls.reference(cfg, inception)
    assert first.path.is_relative_to(tmp_path / "cache") and first.path.is_file()
    assert "is not writable" in calls.lines[-1] and str(first.path) in calls.lines[-1]
    forwards = calls.forwards
    second = calls.reference(cfg, inception)
    assert calls.forwards == forwards and f"from {first.path}" in calls.lines[-1] and _same(first, second)


def test_rfid_with_the_reference_equals_the_in_pass_rfid_and_refuses_other_images(shards, weights, inception):  # noqa: F811
    cfg = _cfg(shards, weights["inception"])
    ref = fid_stats.reference(cfg, shards, "val", inception, None, None)
    with_ref = metrics.ReconstructionMetrics(None, inception, "cpu", fid_features=FEATURES, reference=ref)
    in_pass = metrics.ReconstructionMetrics(None, inception, "cpu", fid_features=FEATURES)
    g = torch.Generator().manual_seed(0)
    batches = [batch.images.clone() for batch in split_batches(cfg, shards, "val")]  # the reader reuses buffers
    for images in batches:
        x = images.float() / 255
        recon = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        with_ref.update(recon, x)
        in_pass.update(recon, x)
    a, b = with_ref.results(), in_pass.results()
    # The same moments up to float64 summation order, amplified by the square root of a rank-9 covariance.
    assert a["rfid"] > 0 and a["rfid"] == pytest.approx(b["rfid"], rel=1e-6)
    assert a["rfid_reference"] == str(ref.path) and b["rfid_reference"] is None

    other = with_ref.fresh()  # the same count of images, one of them not the split's
    for i, images in enumerate(batches):
        x = images.float() / 255
        if i == 0:
            x[0, 0, 0, 0] = 1 - x[0, 0, 0, 0]
        other.update(x, x)
    with pytest.raises(ConfigError, match="count or pixel sum differs"):
        other.results()


@pytest.mark.slow
def test_one_and_two_processes_write_the_same_file(shards, weights, tmp_path):  # noqa: F811
    args = ["-m", "pipeline.fid_stats", str(shards), "--inception-weights", str(weights["inception"]),
            "--features", str(FEATURES), "--batch-size", "3", "--workers", "1"]
    one = subprocess.run([sys.executable, *args], cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    (path,) = (shards / "fid_stats").iterdir()
    one_bytes = path.read_bytes()
    path.unlink()
    launcher = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run([*launcher, *args], cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "computed and written" in two.stdout and path.read_bytes() == one_bytes


@pytest.mark.slow
def test_training_validation_reads_the_cached_reference(shards, weights, tmp_path):  # noqa: F811
    """metrics.in_validation with an Inception file: the first run computes the val split's reference and caches
    it beside the shards, a second run reads it; both log val/rfid."""
    def train(name: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
        args = ["recipes/demo.yaml", f"data.shards={shards}", f"run.dir={tmp_path / 'runs'}", f"run.name={name}",
                "model.arch=conv", "model.channels=[8,16]", "model.latent_dim=8", "data.batch_size_per_device=8",
                "data.num_workers=0", "train.max_steps=2", "train.checkpoint_every_steps=2",
                "tracking.mode=disabled", "tracking.eval_every_steps=1000", "tracking.media_every_steps=1000",
                "metrics.in_validation=true", f"metrics.inception_weights={weights['inception']}",
                f"metrics.fid_features={FEATURES}"]
        r = subprocess.run([sys.executable, "pipeline/train.py", *args], cwd=ROOT, env=TEST_ENV, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        logged = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return r, [m for m in map(json.loads, logged) if "val/rfid" in m]

    first, logged = train("first")
    (cache,) = (shards / "fid_stats").iterdir()
    before = cache.stat()
    assert f"computed and written to {cache}" in first.stdout and len(logged) == 1 and logged[0]["val/rfid"] > 0
    second, logged = train("second")
    assert f"from {cache}" in second.stdout and "computed" not in second.stdout
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(logged) == 1 and logged[0]["val/rfid"] > 0
