"""End-to-end training runs in real processes: DDP over gloo, exact resume after SIGKILL, signals,
the non-finite guard, a two-"machine" launch, and what reaches W&B (read back from the offline files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TEST_ENV, free_port

pytestmark = pytest.mark.slow

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def tiny_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["recipes/demo.yaml", f"data.shards={shards}", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
            "model.channels=[8,16]", "model.latent_dim=8", "data.batch_size_per_device=8", "data.num_workers=1",
            "data.shuffle_buffer_samples=16", "data.val_batch_size_per_device=8",
            "tracking.log_every_steps=1", "tracking.media_every_steps=10", "tracking.eval_every_steps=10",
            "tracking.media_images=4", "train.checkpoint_every_steps=5", "optim.warmup_steps=2",
            "loss.kl.warmup_steps=5", *extra]


def command(nproc: int, args: list[str], machines: int = 1, rank: int = 0, port: int | None = None) -> list[str]:
    if nproc == 1 and machines == 1:
        return [sys.executable, "pipeline/train.py", *args]
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", str(machines),
            "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port",
            str(port or free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", "pipeline/train.py", *args]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def loss_by_step(run_dir: Path) -> dict[int, float]:
    """The last logged loss/total per step (a resumed run re-logs the steps after its checkpoint)."""
    return {m["step"]: m["loss/total"] for m in metrics(run_dir) if "loss/total" in m}


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(loss_by_step(run_dir) or [0]) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def ddp_run(tiny_shards, tmp_path_factory):
    """The uninterrupted 2-process reference run (30 steps)."""
    run_dir = tmp_path_factory.mktemp("runs") / "ddp"
    r = run(command(2, tiny_args(tiny_shards, run_dir, "train.max_steps=30")))
    assert (run_dir / "summary.json").exists(), r.stdout[-2000:] + r.stderr[-4000:]
    return run_dir


def test_two_process_ddp_really_has_world_size_two(ddp_run):
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["step"] == 30
    assert summary["images_seen"] == 30 * 8 * 2
    steps = sorted(loss_by_step(ddp_run))
    assert steps == list(range(1, 31))
    assert (ddp_run / "checkpoints" / "latest").read_text().strip() == "step-000030"
    # The losses went down: a real model trained on real data.
    losses = loss_by_step(ddp_run)
    assert sum(losses[s] for s in range(26, 31)) < sum(losses[s] for s in range(1, 6))


def test_exact_resume_after_sigkill_is_bitwise_identical(ddp_run, tiny_shards, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = command(2, tiny_args(tiny_shards, run_dir, "train.max_steps=30"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=TEST_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for_step(run_dir, proc, 17)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to save: resume must come from step 15's checkpoint
        proc.wait()
    killed_at = max(loss_by_step(run_dir))
    assert 17 <= killed_at < 30
    assert (run_dir / "checkpoints" / "latest").read_text().strip() in ("step-000015", "step-000020", "step-000025")

    r = run(cmd)
    assert (run_dir / "summary.json").exists(), r.stderr[-4000:]
    assert "resumed from" in r.stdout + r.stderr
    reference, resumed = loss_by_step(ddp_run), loss_by_step(run_dir)
    assert sorted(resumed) == list(range(1, 31))
    mismatches = {s: (reference[s], resumed[s]) for s in reference if reference[s] != resumed[s]}
    assert not mismatches, f"resumed losses differ from the uninterrupted run: {mismatches}"


def test_sigusr1_checkpoints_and_exits_75_then_resumes(tiny_shards, tmp_path):
    run_dir = tmp_path / "usr1"
    cmd = command(1, tiny_args(tiny_shards, run_dir, "train.max_steps=500", "train.checkpoint_every_steps=1000"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=TEST_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, proc, 3)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert stopped == max(loss_by_step(run_dir)) and 3 <= stopped < 500
    assert not (run_dir / "summary.json").exists()  # not finished

    r = run(command(1, tiny_args(tiny_shards, run_dir, f"train.max_steps={stopped + 3}")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped:06d}'}" in r.stdout + r.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == stopped + 3


def test_nonfinite_step_is_skipped_counted_and_training_continues(tiny_shards, tmp_path):
    run_dir = tmp_path / "nan"
    r = run(command(1, tiny_args(tiny_shards, run_dir, "train.max_steps=6", "train.inject_nan_at_steps=[3]")))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {m["step"]: m for m in metrics(run_dir) if "loss/total" in m}
    assert rows[3]["train/nonfinite/recon"] == 1.0
    assert rows[6]["train/nonfinite_steps"] == 1.0
    assert all(v == v for m in rows.values() for k, v in m.items() if k.startswith("loss/"))  # no NaN logged
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 6


def test_consecutive_nonfinite_steps_stop_with_one_sentence(tiny_shards, tmp_path):
    run_dir = tmp_path / "nan3"
    r = run(command(1, tiny_args(tiny_shards, run_dir, "train.max_steps=10", "train.inject_nan_at_steps=[2,3,4]",
                                 "train.max_nonfinite_steps=3")))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped at step 4: 3 consecutive steps had a non-finite loss or gradient"), last
    assert "recon" in last


def test_two_machine_launch_on_localhost(tiny_shards, tmp_path):
    run_dir = tmp_path / "twomachines"
    port = free_port()
    args = tiny_args(tiny_shards, run_dir, "train.max_steps=4")
    procs = [subprocess.Popen(command(2, args, machines=2, rank=rank, port=port), cwd=ROOT, env=TEST_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    summary = run_dir / "summary.json"
    assert summary.exists(), outs[0][1][-3000:] + outs[1][1][-3000:]
    assert json.loads(summary.read_text())["world_size"] == 2


def test_bad_recipe_key_exits_2_with_one_line(tiny_shards, tmp_path):
    r = run(command(1, tiny_args(tiny_shards, tmp_path / "bad", "model.latnet_dim=3")))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: command line: unknown key model.latnet_dim (did you mean model.latent_dim?)"]


def test_wandb_offline_run_holds_losses_config_and_media(ddp_run):
    import numpy as np
    from PIL import Image

    import wandb_offline

    rows = wandb_offline.history(ddp_run)
    logged = {k for row in rows for k in row}
    for key in ("loss/recon", "loss/kl", "loss/kl_weighted", "loss/beta", "loss/total", "loss/tv", "train/lr",
                "train/grad_norm", "train/images_per_second", "train/data_wait_fraction", "val/psnr", "val/ssim",
                "val/neg_elbo_nats", "val/elbo_bits_per_dim", "val/kl_nats",
                "val/active_units"):
        assert key in logged, key
    assert wandb_offline.config(ddp_run)["model"]["arch"] == "conv"
    assert wandb_offline.run_id(ddp_run) == (ddp_run / "wandb_run_id").read_text().strip()
    kinds = {}
    for key, step, path in wandb_offline.media(ddp_run):
        kinds.setdefault(key, []).append(step)
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        assert pixels.std() > 5 and pixels.mean() > 5, f"{key} at step {step} is blank"
    for kind in ("media/recon", "media/samples", "media/interpolations", "media/traversals"):
        assert kinds.get(kind) == [10, 20, 30], (kind, kinds)
