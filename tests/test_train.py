"""End-to-end training runs in real processes: DDP over gloo, exact resume after SIGKILL, signals,
the non-finite guard, a two-"machine" launch, and what reaches W&B (read back from the offline files)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, TEST_ENV, free_port
from pipeline import wandb_log
from pipeline.checkpoint import decode_state

pytestmark = pytest.mark.slow

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def tiny_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["recipes/demo.yaml", f"data.shards={shards}", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
            "model.arch=conv", "model.channels=[8,16]", "model.latent_dim=8", "data.batch_size_per_device=8",
            "data.num_workers=1",
            "data.shuffle_buffer_samples=16", "data.val_batch_size_per_device=8",
            "tracking.log_every_steps=1", "tracking.media_every_steps=10", "tracking.eval_every_steps=10",
            "tracking.media_images=4", "train.checkpoint_every_steps=5", "optim.warmup_steps=2",
            "loss.kl.warmup_steps=5", "loss.tv_weight=0.05", *extra]  # a TV term, whose logging is checked


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
    """The uninterrupted 2-process reference run (30 steps), started as two "machines" on localhost: two
    `accelerate launch --num_machines 2` (machine ranks 0 and 1, one process each, one rendezvous). One run for
    the DDP checks and the multi-machine launch's (a separate two-machine run cost another 2-process start);
    the one-machine `--num_processes 2` launch is what every 2-process test elsewhere starts."""
    run_dir = tmp_path_factory.mktemp("runs") / "ddp"
    port = free_port()
    args = tiny_args(tiny_shards, run_dir, "train.max_steps=30")
    procs = [subprocess.Popen(command(2, args, machines=2, rank=rank, port=port), cwd=ROOT, env=TEST_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert (run_dir / "summary.json").exists(), outs[0][1][-3000:] + outs[1][1][-3000:]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    return run_dir


def test_two_process_ddp_on_two_machines_really_has_world_size_two(ddp_run):
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["world_size"] == 2  # one process of each machine, in one group
    assert summary["step"] == 30
    assert summary["images_seen"] == 30 * 8 * 2
    steps = sorted(loss_by_step(ddp_run))
    assert steps == list(range(1, 31))
    assert (ddp_run / "checkpoints" / "latest").read_text().strip() == "step-000030"
    # The losses went down: a real model trained on real data.
    losses = loss_by_step(ddp_run)
    assert sum(losses[s] for s in range(26, 31)) < sum(losses[s] for s in range(1, 6))


def test_a_second_trainer_on_a_live_run_folder_refuses_then_sigusr1_checkpoints_exits_75_and_resumes(
        tiny_shards, tmp_path):
    """One live run for two checks (one trainer start less): while it trains, a second trainer on its folder
    exits 2 naming the holder and touches nothing; then SIGUSR1 makes it checkpoint and exit 75, and the same
    command continues from that checkpoint, with changed optimizer settings that apply (and a changed
    architecture that is refused)."""
    run_dir = tmp_path / "usr1"
    cmd = command(1, tiny_args(tiny_shards, run_dir, "train.max_steps=5000", "train.checkpoint_every_steps=1000"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=TEST_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run_dir, proc, 3)
        config = (run_dir / "config.yaml").read_bytes()
        r = run(command(1, tiny_args(tiny_shards, run_dir, "train.max_steps=10")))
        assert r.returncode == 2
        assert r.stderr.strip().splitlines() == [
            f"error: run folder {run_dir} is in use by pid {proc.pid} on {socket.gethostname()}, started "
            f"{json.loads((run_dir / '.lock').read_text())['started']}; wait for that run to finish or stop it "
            f"(kill {proc.pid}), or train in another folder with run.name=..."]
        assert (run_dir / "config.yaml").read_bytes() == config  # nothing of the live run was touched
        assert len((run_dir / "starts.jsonl").read_text().splitlines()) == 1
    finally:
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert stopped == max(loss_by_step(run_dir)) and 3 <= stopped < 5000
    assert not (run_dir / "summary.json").exists()  # not finished

    # Resumed with other optimizer settings: they apply (torch's load_state_dict would restore the saved
    # param groups) and are recorded in starts.jsonl and in the W&B config.
    changed = ["optim.weight_decay=0.1", "optim.betas=[0.5,0.9]"]
    r = run(command(1, tiny_args(tiny_shards, run_dir, f"train.max_steps={stopped + 3}", *changed)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped:06d}'}" in r.stdout + r.stderr
    assert (f"changed since the checkpoint, applied from step {stopped + 1}: optim.weight_decay 0.0 -> 0.1, "
            f"optim.betas [0.9, 0.999] -> [0.5, 0.9], train.max_steps 5000 -> {stopped + 3}, "
            f"train.checkpoint_every_steps 1000 -> 5\n") in r.stdout + r.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == stopped + 3
    expected = {"optim.weight_decay": [0.0, 0.1], "optim.betas": [[0.9, 0.999], [0.5, 0.9]],
                "train.max_steps": [5000, stopped + 3], "train.checkpoint_every_steps": [1000, 5]}
    assert json.loads((run_dir / "starts.jsonl").read_text().splitlines()[1])["changed"] == expected
    final = run_dir / "checkpoints" / f"step-{stopped + 3:06d}"
    groups = decode_state(json.loads((final / "optimizer.json").read_text()),
                          load_file(str(final / "optimizer.safetensors")))["param_groups"]
    assert [(g["weight_decay"], g["betas"]) for g in groups] == [(0.1, (0.5, 0.9))]  # what the last steps used
    logged = wandb_log.config(run_dir)
    assert (logged["optim"]["weight_decay"], logged["optim"]["betas"]) == (0.1, [0.5, 0.9])
    assert logged["changed_on_resume"] == {"2": {"step": stopped, "changed": expected}}

    # A changed architecture is refused in one sentence naming the key, before the run folder is touched.
    config = (run_dir / "config.yaml").read_bytes()
    r = run(command(1, tiny_args(tiny_shards, run_dir, f"train.max_steps={stopped + 3}", *changed,
                                 "model.latent_dim=16")))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: checkpoint {final} was trained with model.latent_dim=8 and this run has model.latent_dim=16, which "
        f"cannot change when a run is resumed (the checkpoint's weights are those of the model it was trained "
        f"with); resume with model.latent_dim=8, or train in a new run folder (run.name=...) or from scratch "
        f"(train.resume=never)"]
    assert (run_dir / "config.yaml").read_bytes() == config
    assert len((run_dir / "starts.jsonl").read_text().splitlines()) == 2


def test_a_nonfinite_step_changes_nothing_and_is_counted(tiny_shards, tmp_path):
    """NaN images at step 3 of a BatchNorm recipe: the checkpoint after step 3 equals the one after step 2
    in every tensor (weights, BatchNorm statistics, optimizer moments and step counts, EMA), training
    goes on, and validation and media afterwards are finite."""
    run_dir = tmp_path / "nan"
    r = run(command(1, tiny_args(tiny_shards, run_dir, "train.max_steps=6", "train.inject_nan_at_steps=[3]",
                                 "train.checkpoint_every_steps=1", "train.keep_checkpoints=10",
                                 "tracking.media_every_steps=6", "tracking.eval_every_steps=6")))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        before, after = load_file(str(ckpts / "step-000002" / name)), load_file(str(ckpts / "step-000003" / name))
        assert before.keys() == after.keys()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, f"{name}: the skipped step changed {changed[:5]}"
    bn = load_file(str(ckpts / "step-000003" / "model.safetensors"))
    assert any(k.endswith("running_var") for k in bn)  # the recipe really has BatchNorm
    moved = load_file(str(ckpts / "step-000004" / "model.safetensors"))
    assert any(not torch.equal(bn[k], moved[k]) for k in bn)  # ... and step 4 trained again

    rows = {m["step"]: m for m in metrics(run_dir) if "train/nonfinite_steps" in m}
    assert rows[3]["train/nonfinite/recon"] == 1 and rows[3]["train/nonfinite/total"] == 1
    assert "loss/total" not in rows[3]  # nothing to average: the one step of the interval was skipped
    assert [rows[s]["train/nonfinite_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    val = {k: v for m in metrics(run_dir) for k, v in m.items() if k.startswith("val/")}
    assert val and all(np.isfinite(v) for v in val.values()), val
    recon = np.asarray(Image.open(run_dir / "media" / "recon-000006.png").convert("RGB"), dtype=np.float32)
    h = recon.shape[0] // 2
    assert recon[h:].std() > 5  # the reconstructions row is an image, not a NaN-black band


def test_nonfinite_counts_are_exact_steps_under_ddp(tiny_shards, tmp_path):
    """NaN on rank 1 only: both ranks skip the step (their weights stay identical) and count one step, not
    the average 0.5 of a per-rank count."""
    run_dir = tmp_path / "nan2"
    r = run(command(2, tiny_args(tiny_shards, run_dir, "train.max_steps=4", "train.inject_nan_at_steps=[2]",
                                 "train.inject_nan_rank=1")))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {m["step"]: m for m in metrics(run_dir) if "train/nonfinite_steps" in m}
    assert rows[2]["train/nonfinite/recon"] == 1 and rows[4]["train/nonfinite_steps"] == 1
    assert isinstance(rows[4]["train/nonfinite_steps"], int)


def test_consecutive_nonfinite_steps_stop_with_one_sentence(tiny_shards, tmp_path):
    run_dir = tmp_path / "nan3"
    r = run(command(1, tiny_args(tiny_shards, run_dir, "train.max_steps=10", "train.inject_nan_at_steps=[2,3,4]",
                                 "train.max_nonfinite_steps=3")))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped at step 4: 3 consecutive steps had a non-finite loss or gradient"), last
    assert "recon" in last


def test_bad_recipe_key_exits_2_with_one_line(tiny_shards, tmp_path):
    r = run(command(1, tiny_args(tiny_shards, tmp_path / "bad", "model.latnet_dim=3")))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: command line: unknown key model.latnet_dim (did you mean model.latent_dim?)"]


def test_a_replaced_shard_stops_training_in_one_sentence_or_is_skipped_by_choice(tiny_shards, tmp_path):
    """`cp train-000000.tar train-000001.tar`: shard 0 would be read twice an epoch and shard 1 never. Tars
    are padded to 10 KiB records, so the copy here has the same size: the sha256 check finds it."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    (shards / "train-000001.tar").write_bytes((shards / "train-000000.tar").read_bytes())
    check = "data.verify_shards=sha256"
    r = run(command(1, tiny_args(shards, tmp_path / "stop", "train.max_steps=2", check)))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert re.match(r"error: shard .*/train-000001.tar (does not match the sha256|has \d+ bytes).*: it was replaced", r.stderr)
    r = run(command(1, tiny_args(shards, tmp_path / "skip", "train.max_steps=2", check, "data.on_damaged_shard=skip")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"leaving out 1 damaged train shard\(s\) of 3 \(32 of \d+ samples\): .*train-000001.tar", r.stderr)


def test_wandb_offline_run_holds_losses_config_and_media(ddp_run):
    import numpy as np
    from PIL import Image

    from pipeline import wandb_log as wandb_offline

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


# --------------------------------------------------------------------------------------------
# train_step in this process: what is counted and what is logged
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def step_setup(tiny_shards):
    from accelerate import Accelerator

    from pipeline.config import load_config
    from pipeline.step import build_training

    cfg = load_config("recipes/demo.yaml", [f"data.shards={tiny_shards}", "model.arch=resnet", "model.channels=[8,16]",
                                            "model.latent=spatial", "model.latent_channels=2", "train.grad_accum_steps=2",
                                            "loss.tv_weight=0.05"])  # the test checks the TV term too
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    return cfg, accelerator, build_training(cfg, accelerator, 32)


def test_an_infinite_gradient_with_finite_losses_is_skipped_and_counted(step_setup):
    from pipeline.step import train_step

    cfg, accelerator, t = step_setup
    before = {k: v.clone() for k, v in t.vae.state_dict().items()}
    param = next(t.vae.parameters())
    hook = param.register_hook(lambda g: torch.full_like(g, float("inf")))
    try:
        x = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(2)]
        result = train_step(t, accelerator, x, 0, cfg)
    finally:
        hook.remove()
    assert all(torch.isfinite(v) for v in result.terms.values())
    assert result.nonfinite["grad_norm"] == 1 and not result.ok
    assert all(result.nonfinite[k] == 0 for k in result.terms)
    assert all(torch.equal(before[k], v) for k, v in t.vae.state_dict().items())


def test_logged_terms_are_the_mean_over_the_micro_batches(step_setup):
    from pipeline.step import train_step

    cfg, accelerator, t = step_setup
    g = torch.Generator().manual_seed(1)
    x = [torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.zeros(4, 3, 32, 32)]  # two very different micro-batches
    weights = {k: v.clone() for k, v in t.module.state_dict().items()}
    torch.manual_seed(0)
    result = train_step(t, accelerator, x, 10, cfg)
    t.module.load_state_dict(weights)
    torch.manual_seed(0)  # the same reparameterisation noise, micro-batch by micro-batch
    with torch.no_grad():
        each = [t.module(m, 10)[1] for m in x]
    for name in ("recon", "kl", "tv"):
        expected = (each[0].terms[name] + each[1].terms[name]) / 2
        assert torch.allclose(result.terms[name], expected, rtol=1e-5), name
    assert torch.allclose(result.terms["total"], (each[0].total + each[1].total) / 2, rtol=1e-5)
    # not the last micro-batch's: the reconstruction error of noise and of a flat image differ widely
    assert abs(result.terms["recon"] - each[1].terms["recon"]) > 0.1 * abs(each[0].terms["recon"] - each[1].terms["recon"])

