"""Checkpoints: `latest` never names a half-written checkpoint, whatever moment a kill lands on,
and everything loads without unpickling."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, TEST_ENV

# Saves checkpoints in a loop (a ~8 MB model so each save takes long enough to be hit mid-way), or,
# with "load", restores the latest one and prints its step.
SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from accelerate import Accelerator
from pipeline.checkpoint import Checkpointer
from pipeline.optim import EMA
mode, run_dir = sys.argv[1], Path(sys.argv[2])
acc = Accelerator(cpu=True)
model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
opt = torch.optim.AdamW(model.parameters())
model, opt = acc.prepare(model, opt)
ema = EMA(acc.unwrap_model(model), 0.9)
ckpt = Checkpointer(run_dir, acc, every_steps=1, keep=2)
if mode == "load":
    state = ckpt.load(ckpt.resolve("auto"), ema)
    w = acc.unwrap_model(model)[0].weight
    assert torch.equal(w, torch.full_like(w, float(state["step"]))), "weights do not match the step"
    print(json.dumps(state))
else:
    start = ckpt.load(ckpt.resolve("auto"), ema)["step"] + 1 if ckpt.latest_name() else 1
    for step in range(start, start + 10_000):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        ckpt.maybe_save(step, ema, lambda: {"step": step, "images_seen": step, "stream": {}})
        print(step, flush=True)
"""


def check_invariant(run_dir: Path) -> int | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return None
    ckpt = run_dir / "checkpoints" / latest.read_text().strip()
    assert ckpt.is_dir(), f"latest names {ckpt.name}, which does not exist"
    step = json.loads((ckpt / "trainer_rank0.json").read_text())["step"]
    assert ckpt.name == f"step-{step:06d}"
    for name in ("model.safetensors", "ema.safetensors"):
        tensors = load_file(str(ckpt / name))
        assert tensors, name
    assert (ckpt / "optimizer.bin").stat().st_size > 0
    return step


@pytest.mark.slow
def test_latest_survives_kills_at_random_moments(tmp_path):
    run_dir = tmp_path / "run"
    rng = random.Random(0)
    last_step = 0
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, "save", str(run_dir)], cwd=ROOT, env=TEST_ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # one checkpoint done: the next saves are in flight
        assert first.strip(), proc.stderr.read()[-2000:]
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = check_invariant(run_dir)
        assert step is not None and step >= 1
        last_step = step
        assert step >= last_step  # resumed, never went back
    assert len(list((run_dir / "checkpoints").glob("step-*"))) <= 3  # keep=2, plus at most one being pruned

    r = subprocess.run([sys.executable, "-c", SCRIPT, "load", str(run_dir)], cwd=ROOT, env=TEST_ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == last_step
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # stale partial saves cleaned at start
