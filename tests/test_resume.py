"""Exact resume after SIGKILL, in real processes, for every architecture family, 1 and 2 processes and
0, 1 and 2 data workers, with kills at every kind of moment (issue 14).

Each case trains a tiny model for 16 steps (checkpoints every 4, validation and media every 5; with
86 training images at 8 per device an epoch is ~11 steps on one process and ~5 on two, so every
resumed segment crosses an epoch boundary). The run is SIGKILLed — every process of it, found by
pid, not just the launcher's group — and started again with the same command. Then:
- no process of the first launch is alive;
- the rows of metrics.jsonl after the checkpoint come from the second start (its segment number
  and pid), so the restarted process did the work, not a survivor of the first;
- every logged loss term of those steps is bitwise equal to the uninterrupted run's.

Kill points: "external" (the test kills everything once step <step> was logged; VAE_PAUSE_AT holds the
run just after the next optimizer step, so however fast the steps run, the kill lands before the next
checkpoint), "group" (kill -9
of the launcher's process group after a checkpoint: the workers must die with their launcher), and
points inside the trainer reached through VAE_KILL_AT=<point>@<step> (pipeline/faults.py): while a
checkpoint is being written, right after one, during validation, during media.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TEST_ENV, free_port
from processes import Launch

pytestmark = pytest.mark.slow

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
STEPS = 16

ARCHS = {
    # BatchNorm, channels_last weights (recipes/flowers.yaml's switch): the fused AdamW's moments must come
    # back in the weights' layout, or the CPU kernel pairs the wrong elements after the restore
    "conv": ["model.arch=conv", "model.channels=[8,16]", "model.latent_dim=8", "train.channels_last=true"],
    "dcgan": ["model.arch=dcgan", "model.channels=[8,16]", "model.latent=spatial", "model.latent_channels=2",
              "model.samples_per_input=2", "train.channels_last=true"],  # BatchNorm, several draws of z per input
    "resnet": ["model.arch=resnet", "model.channels=[8,16]", "model.latent=spatial", "model.latent_channels=2",
               "model.attention_levels=[1]"],  # GroupNorm + attention
    # recipes/flowers_gan.yaml, tiny: the discriminator trains from step index 3, reaches the generator from
    # 5 (after the kill's checkpoint at 4), with LeCam anchors; two optimizers under gradient accumulation
    # (2 x 4 images: the same 8 per device per step); W&B offline for the panels' test below.
    "gan": ["model.channels=[8,16]", "model.latent_dim=8", "loss.perceptual.weight=0", 'train.mixed_precision="no"',
            "train.channels_last=false", "loss.adversarial.disc_channels=8", "loss.adversarial.disc_layers=2",
            "loss.adversarial.disc_start=3", "loss.adversarial.disc_warmup_steps=2",
            "loss.adversarial.lecam_weight=0.1", "train.grad_accum_steps=2", "data.batch_size_per_device=4",
            "tracking.mode=offline"],
    # recipes/vq_f8.yaml, tiny: an EMA codebook (buffers moved once per step), dead-code restarts every 3 steps
    # (before and after the kill), the usage window; its codebook/* scalars are compared like the losses.
    "vq": ["model.channels=[8,16]", "model.latent_channels=4", "model.quantizer.kind=ema",
           "model.quantizer.codebook_size=32", "model.quantizer.lookup_dim=0", "model.quantizer.restart_every_steps=3",
           "model.quantizer.restart_threshold=12"],
    # model.spatial_dims 1 and 3 through the same trainer: float array shards (conftest's signal_shards,
    # volume_shards), the flip drawn from the device RNG, GroupNorm + 1-D attention / BatchNorm3d.
    "signals1d": ["model.channels=[8,16]", "model.latent_channels=2", "model.attention_levels=[1]",
                  "data.rotation_degrees=0", "data.hflip=true"],
    "volumes3d": ["model.channels=[4,8]", "model.latent_channels=2", "data.rotation_degrees=0", "loss.ssim_window=3"],
}
RECIPES = {"gan": "recipes/flowers_gan.yaml", "vq": "recipes/vq_f8.yaml", "signals1d": "recipes/signals1d.yaml",
           "volumes3d": "recipes/volumes3d.yaml"}  # the others: recipes/demo.yaml
SHARDS = {"signals1d": "signal_shards", "volumes3d": "volume_shards"}  # conftest fixtures; the others: tiny_shards


def args(shards: Path, run_dir: Path, arch: str, workers: int, *extra: str) -> list[str]:
    return [RECIPES.get(arch, "recipes/demo.yaml"), f"data.shards={shards}", f"run.dir={run_dir.parent}",
            f"run.name={run_dir.name}", "data.batch_size_per_device=8", f"data.num_workers={workers}",
            "data.val_batch_size_per_device=8", "tracking.log_every_steps=1", "tracking.media_every_steps=5",
            "tracking.eval_every_steps=5", "tracking.media_images=4", "tracking.mode=disabled",
            "train.checkpoint_every_steps=4", "train.keep_checkpoints=10", f"train.max_steps={STEPS}",
            "optim.warmup_steps=2", "loss.kl.warmup_steps=5", "data.rotation_degrees=10", *ARCHS[arch], *extra]


def command(nproc: int, argv: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "pipeline/train.py", *argv]
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", "pipeline/train.py", *argv]


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    complete = path.read_text().split("\n")[:-1]  # not a line being written
    return [json.loads(line) for line in complete if line.strip()]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in rows(run_dir) if "loss/total" in r]


def latest(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("-")[1]) if pointer.exists() else 0


_references: dict[tuple, Path] = {}


def shards_for(request, arch: str) -> Path:
    return request.getfixturevalue(SHARDS.get(arch, "tiny_shards"))


@pytest.fixture(scope="module")
def reference(request, tmp_path_factory):
    """The uninterrupted run of a configuration (made once per configuration per module, shared by every
    case and test of that configuration)."""

    def get(arch: str, nproc: int, workers: int) -> Path:
        key = (arch, nproc, workers)
        if key not in _references:
            run_dir = tmp_path_factory.mktemp("ref") / f"{arch}-{nproc}p-w{workers}"
            launch = Launch(command(nproc, args(shards_for(request, arch), run_dir, arch, workers)), TEST_ENV, ROOT)
            assert launch.wait(300) == 0, launch.output()[-4000:]
            assert json.loads((run_dir / "summary.json").read_text())["world_size"] == nproc
            _references[key] = run_dir
        return _references[key]

    return get


def xdist_group_of(item) -> str | None:
    """For `make test`'s workers (tests/conftest.py): the tests that share one configuration's uninterrupted
    reference run go to one worker; the configurations themselves spread over the workers."""
    if "reference" not in item.fixturenames:
        return None
    callspec = getattr(item, "callspec", None)
    arch, nproc, workers = (("gan", 2, 2) if callspec is None else
                            (callspec.params["arch"], callspec.params["nproc"], callspec.params["workers"]))
    return f"test_resume-{arch}-{nproc}p-w{workers}"


CASES = [
    # arch, processes, workers, kill point, step. Every architecture, both process counts and every
    # worker count appear (2 processes with 2 workers each too); the full product would take half an hour
    # on two cores. Each configuration costs one uninterrupted reference run (a process start-up, the bulk
    # of a case's time), so kill points come in pairs on one configuration where they can.
    ("conv", 1, 1, "external", 7),        # between checkpoints (latest: 4)
    ("conv", 1, 1, "after-checkpoint", 8),  # right after step 8's checkpoint was committed
    ("dcgan", 1, 0, "media", 10),         # while drawing the media panels at step 10
    ("dcgan", 1, 0, "validation", 10),    # in the middle of the validation pass at step 10
    ("resnet", 2, 1, "checkpoint", 12),   # while step 12's checkpoint is being written
    ("resnet", 2, 1, "group", 8),         # kill -9 of the launcher's group right after a checkpoint
    ("gan", 2, 2, "external", 6),         # the adversarial stage: discriminator, its optimizer, LeCam state
    ("vq", 1, 0, "external", 7),          # quantized: EMA codebook, restart and usage statistics
    ("signals1d", 1, 1, "external", 7),   # 1-D float array shards, one reader worker
    ("volumes3d", 1, 0, "validation", 10),  # 3-D volumes read in the training process, killed in validation
]


@pytest.mark.parametrize("arch, nproc, workers, point, step", CASES,
                         ids=[f"{a}-{n}p-w{w}-{p}@{s}" for a, n, w, p, s in CASES])
def test_sigkill_anywhere_then_same_command_resumes_bitwise(request, tmp_path, reference, arch, nproc, workers,
                                                            point, step):
    run_dir = tmp_path / "run"
    cmd = command(nproc, args(shards_for(request, arch), run_dir, arch, workers))
    env = dict(TEST_ENV)
    if point == "external":  # (at ~36 steps/s, as in CI, an unpaused run reached step 8's checkpoint first)
        env["VAE_PAUSE_AT"] = f"step@{step + 1}:600"
    elif point != "group":
        env["VAE_KILL_AT"] = f"{point}@{step}"  # the trainer SIGKILLs its launcher and itself there
    first = Launch(cmd, env, ROOT)
    if point == "external":
        first.wait_until(lambda: len(train_rows(run_dir)) >= step, 180, f"step {step}")
        first.kill_all()
    elif point == "group":
        first.wait_until(lambda: latest(run_dir) >= step, 180, f"checkpoint {step}")
        first.kill_group()  # only the launcher's group: its workers must follow it
    else:
        first.wait(180)
    assert first.survivors() == [], "processes of the killed run are still alive"
    first.kill_all()  # (a no-op when the assertion above holds)
    killed_at = max((r["step"] for r in train_rows(run_dir)), default=0)
    checkpoint = latest(run_dir)
    assert 0 < checkpoint <= step <= killed_at < STEPS, (checkpoint, step, killed_at, first.output()[-3000:])
    assert point != "external" or killed_at == step  # held by the pause until the kill

    second = Launch(cmd, TEST_ENV, ROOT)
    assert second.wait(300) == 0, second.output()[-4000:]
    out = second.output()
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{checkpoint:06d}'} at step {checkpoint}" in out

    # The restarted process trained every step after the checkpoint (not a survivor of the first start):
    # those rows carry segment 2, and starts.jsonl says segment 2 is a process of the second launch.
    starts = [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]
    assert [s["segment"] for s in starts] == [1, 2] and starts[1]["step"] == checkpoint
    assert starts[1]["pid"] in second.seen and starts[1]["pid"] not in first.seen
    resumed = {r["step"]: r for r in train_rows(run_dir) if r["step"] > checkpoint and r["segment"] == 2}
    assert sorted(resumed) == list(range(checkpoint + 1, STEPS + 1)), sorted(resumed)
    # ... and reproduced the uninterrupted run bit for bit.
    ref = {r["step"]: r for r in train_rows(reference(arch, nproc, workers))}
    diffs = {(s, k): (ref[s][k], r[k]) for s, r in resumed.items() for k in ref[s]
             if k.startswith(("loss/", "codebook/")) and ref[s][k] != r[k]}
    assert not diffs, f"resumed losses differ from the uninterrupted run: {dict(list(diffs.items())[:8])}"
    assert json.loads((run_dir / "summary.json").read_text())["step"] == STEPS


def test_gan_recipe_under_ddp_logs_the_adversarial_terms_and_the_discriminator_panels(reference):
    """recipes/flowers_gan.yaml on 2 processes (the resume case's uninterrupted run): the adversarial
    stage's scalars and the discriminator's logit panels reach the W&B offline run."""
    import numpy as np
    from PIL import Image

    from pipeline import wandb_log

    run_dir = reference("gan", 2, 2)
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    rows = wandb_log.history(run_dir)
    logged = {k: [r["_step"] for r in rows if k in r] for k in {k for r in rows for k in r}}
    # The discriminator trains from step index 3 (logged as step 4), the generator sees it from 5 (step 6).
    for key in ("loss/gan_d", "loss/gan_logits_real", "loss/gan_logits_fake", "loss/gan_disc_accuracy",
                "loss/gan_lecam", "loss/gan_grad_norm"):
        assert logged.get(key, [None])[0] == 4, (key, logged.get(key))
    for key in ("loss/gan_g", "loss/gan_adaptive_weight", "loss/gan_g_weighted"):
        assert logged.get(key, [None])[0] == 6, (key, logged.get(key))
    weights = [r["loss/gan_adaptive_weight"] for r in rows if "loss/gan_adaptive_weight" in r]
    assert all(0 < w < 1e4 for w in weights), weights
    panels = [(step, path) for key, step, path in wandb_log.media(run_dir) if key == "media/disc"]
    assert [s for s, _ in panels] == [5, 10, 15, 16], panels
    for _, path in panels:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        tile = (pixels.shape[0] - 2) // 4  # four rows: inputs, their logits, reconstructions, their logits
        heat = pixels[2 + tile: 2 * tile, 2:-2]
        assert heat[..., 1].mean() > 20 and heat[..., 0].mean() > 20  # the heat map's red/green, not black
        assert pixels[2:tile].std() > 5  # the inputs row is an image


def test_resume_on_fewer_processes_continues_the_run(tiny_shards, tmp_path):
    """A 2-process run killed after its step-8 checkpoint, continued by 1 process (a job requeued onto
    fewer nodes): same run folder, step, schedule and data position; the world size change is said."""
    run_dir = tmp_path / "shrink"
    argv = args(tiny_shards, run_dir, "conv", 1)
    first = Launch(command(2, argv), {**TEST_ENV, "VAE_KILL_AT": "after-checkpoint@8"}, ROOT)
    first.wait(180)
    assert first.survivors() == [] and latest(run_dir) == 8

    second = Launch(command(1, argv), TEST_ENV, ROOT)
    assert second.wait(300) == 0, second.output()[-4000:]
    out = second.output()
    assert "resumed from" in out and "the checkpoint was written by 2 processes and this run has 1" in out
    assert "losses are not bitwise" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["world_size"] == 1
    assert summary["images_seen"] == 8 * 2 * 8 + (STEPS - 8) * 8  # the global data position continued
    rows = train_rows(run_dir)
    assert sorted(r["step"] for r in rows if r["segment"] == 2) == list(range(9, STEPS + 1))
    epoch = {r["step"]: r["train/epoch"] for r in rows}
    assert epoch[9] == pytest.approx((8 * 16 + 8) / 86)


def test_two_kills_leave_one_continuous_wandb_history_and_one_sync(tiny_shards, tmp_path):
    """40 steps killed at step 26 (checkpoint 24) and at step 34 (checkpoint 32), then finished. The
    offline segments of the one W&B run hold every step exactly once, and `make sync` uploads them in
    one `wandb sync` call, in start order.

    Both ways a step reaches W&B are exercised: wandb-core writes its file in 32 KiB blocks, so the
    first segment's file holds the first ~20 steps and the second segment's (10 steps) nothing. The
    second start therefore logs to W&B from metrics.jsonl the steps after what the first file holds up
    to its checkpoint, then trains on; the third does the same from the first file's last step."""
    from pipeline import wandb_log

    steps = 40
    run_dir = tmp_path / "wb"
    cmd = command(1, args(tiny_shards, run_dir, "conv", 0, "tracking.mode=offline", f"train.max_steps={steps}"))
    said = []
    for kill in ("step@26", "step@34", None):
        launch = Launch(cmd, {**TEST_ENV, **({"VAE_KILL_AT": kill} if kill else {})}, ROOT)
        code = launch.wait(300)
        assert code == (0 if kill is None else -9), launch.output()[-3000:]
        launch.survivors(grace_s=30)  # wandb-core writes what it has and exits after its parent died
        said += [line for line in launch.output().splitlines() if line.startswith("W&B: run ")]
    floors = [int(line.split("holds steps up to ")[1].split(";")[0]) for line in said]
    assert len(floors) == 2 and 0 < floors[0] < 24, said  # the first file held some steps, not all
    assert all("more up to step" in line for line in said), said  # both restarts filled a gap from metrics.jsonl

    segments = wandb_log.segments(run_dir)
    assert len(segments) >= 2 and len({run_id for _, run_id, _, _ in segments}) == 1
    logged = [row["_step"] for row in wandb_log.history(run_dir)]
    assert sorted(logged) == list(range(1, steps + 1)), logged  # every step, none twice
    media = {(key, step) for key, step, _ in wandb_log.media(run_dir)}
    assert {("media/recon", s) for s in range(5, steps + 1, 5)} <= media  # panels of the gaps too

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "wandb").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
    (fake / "wandb").chmod(0o755)
    r = subprocess.run(["make", "--no-print-directory", "sync", f"RUNS={tmp_path}"], cwd=ROOT, capture_output=True,
                       text=True, env={**TEST_ENV, "PATH": f"{fake}:{TEST_ENV['PATH']}"}, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["sync " + " ".join(str(folder) for folder, _, _, _ in segments)]


def test_a_restart_before_the_last_logged_step_does_not_log_those_steps_twice(tiny_shards, tmp_path):
    """A finished 12-step run continued to 20 steps from its step-8 checkpoint: the second start trains
    steps 9-12 again, but its W&B segment starts at step 13 (the first file holds 1-12)."""
    from pipeline import wandb_log

    run_dir = tmp_path / "again"
    base = args(tiny_shards, run_dir, "conv", 0, "tracking.mode=offline")
    assert Launch(command(1, [*base, "train.max_steps=12"]), TEST_ENV, ROOT).wait(300) == 0
    resume = f"train.resume={run_dir / 'checkpoints' / 'step-000008'}"
    second = Launch(command(1, [*base, "train.max_steps=20", resume]), TEST_ENV, ROOT)
    assert second.wait(300) == 0, second.output()[-3000:]
    assert f"holds steps up to 12; this start logs from step 13" in second.output()
    logged = [row["_step"] for row in wandb_log.history(run_dir)]
    assert sorted(logged) == list(range(1, 21)), logged
    assert sorted(r["step"] for r in train_rows(run_dir) if r["segment"] == 2) == list(range(9, 21))
