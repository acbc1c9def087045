"""Checkpoints: `latest` never names a half-written checkpoint, whatever moment a kill lands on; every
file is fsynced before `latest` moves; `auto` falls back to the newest complete checkpoint; nothing is
unpickled; state dicts and RNG states round-trip exactly, and a bad RNG state is an error."""

from __future__ import annotations

import json
import os
import pickle
import re
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import ROOT, TEST_ENV
from pipeline import checkpoint as ck
from pipeline.checkpoint import Checkpointer, Parts, decode_state, encode_state, incomplete_reason
from pipeline.config import ConfigError
from pipeline.errors import UserError
from pipeline.optim import EMA

# Saves checkpoints in a loop (a ~8 MB model so each save takes long enough to be hit mid-way), or,
# with "load", restores the latest one and prints its step.
SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from accelerate import Accelerator
from pipeline.checkpoint import Checkpointer, Parts
from pipeline.optim import EMA
mode, run_dir = sys.argv[1], Path(sys.argv[2])
acc = Accelerator(cpu=True)
model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
opt = torch.optim.AdamW(model.parameters())
model, opt = acc.prepare(model, opt)
ema = EMA(acc.unwrap_model(model), 0.9)
parts = Parts(acc.unwrap_model(model), torch.nn.Module(), opt, ema)
ckpt = Checkpointer(run_dir, acc, every_steps=1, keep=2)
found = ckpt.resolve("auto")
if mode == "load":
    resumed = ckpt.load(found, parts)
    w = acc.unwrap_model(model)[0].weight
    assert torch.equal(w, torch.full_like(w, float(resumed.step))), "weights do not match the step"
    print(json.dumps(resumed.trainer))
else:
    start = ckpt.load(found, parts).step + 1 if found else 1
    for step in range(start, start + 10_000):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        ckpt.maybe_save(step, parts, lambda: {"step": step})
        print(step, flush=True)
"""


def check_invariant(run_dir: Path) -> int | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return None
    ckpt = run_dir / "checkpoints" / latest.read_text().strip()
    assert ckpt.is_dir(), f"latest names {ckpt.name}, which does not exist"
    assert incomplete_reason(ckpt) is None, incomplete_reason(ckpt)
    step = json.loads((ckpt / "trainer_rank0.json").read_text())["step"]
    assert ckpt.name == f"step-{step:06d}"
    for name in ("model.safetensors", "ema.safetensors"):
        assert load_file(str(ckpt / name)), name
    return step


@pytest.mark.slow
def test_latest_survives_kills_at_random_moments(tmp_path):
    run_dir = tmp_path / "run"
    rng = random.Random(0)
    last_step = 0
    for trial in range(4):
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, "save", str(run_dir)], cwd=ROOT, env=TEST_ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # one checkpoint done: the next saves are in flight
        assert first.strip(), proc.stderr.read()[-2000:]
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = check_invariant(run_dir)
        assert step is not None and step >= max(1, last_step)  # resumed, never went back
        last_step = step
        # keep=2, plus at most the one committed just before the kill, whose save had not pruned yet
        # (the next save prunes it: without pruning, 60 saves pile up here)
        assert len(list((run_dir / "checkpoints").glob("step-*"))) <= 3

    r = subprocess.run([sys.executable, "-c", SCRIPT, "load", str(run_dir)], cwd=ROOT, env=TEST_ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == last_step
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert not leftovers  # partial saves and prunes cleaned at start


# --------------------------------------------------------------------------------------------
# In-process: one Accelerator on the CPU, a small model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acc():
    return Accelerator(cpu=True)


def make_parts(acc, seed: int = 0, ema: bool = True):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    loss = torch.nn.Module()
    loss.logvar = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([*model.parameters(), loss.logvar], lr=1e-2, betas=(0.8, 0.95), fused=True)
    model, opt = acc.prepare(model, opt)
    return Parts(acc.unwrap_model(model), loss, opt, EMA(acc.unwrap_model(model), 0.5) if ema else None)


def train_a_little(parts: Parts, steps: int = 3) -> None:
    for _ in range(steps):
        out = parts.vae(torch.randn(4, 3, 6, 6)).pow(2).mean() + parts.loss.logvar.pow(2).sum()
        out.backward()
        parts.optimizer.step()
        parts.optimizer.zero_grad()
        parts.ema.update(parts.vae, 1)


def test_save_then_load_restores_everything_exactly_and_only_safetensors_and_json(acc, tmp_path, monkeypatch):
    parts = make_parts(acc)
    train_a_little(parts)
    ckpt = Checkpointer(tmp_path, acc, every_steps=1, keep=3)
    random.random(), np.random.rand(), torch.rand(1)
    path = ckpt.save(7, parts, {"step": 7, "anything": [1, 2]})
    expected = (random.random(), float(np.random.rand()), torch.rand(1))  # what the RNGs give after the save
    assert {p.suffix for p in path.iterdir()} == {".safetensors", ".json"}

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh = make_parts(acc, seed=1)
    resumed = ckpt.load(ckpt.resolve("auto"), fresh)
    assert resumed.step == 7 and resumed.trainer == {"step": 7, "anything": [1, 2]} and resumed.same_world_size
    for a, b in [(parts.vae.state_dict(), fresh.vae.state_dict()), (parts.ema.state_dict(), fresh.ema.state_dict()),
                 (parts.loss.state_dict(), fresh.loss.state_dict())]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mine, theirs = parts.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    assert isinstance(theirs["param_groups"][0]["betas"], tuple)
    for i, state in mine["state"].items():
        assert all(torch.equal(v, theirs["state"][i][k]) for k, v in state.items())
    ck.restore_rng(resumed.rng, acc.device, path)
    assert (random.random(), float(np.random.rand()), torch.rand(1)) == expected


def test_state_encoding_round_trips_tuples_int_keys_and_specials():
    state = {"state": {0: {"step": torch.tensor(3.0), "m": torch.arange(4.0)}, 7: {}},
             "param_groups": [{"betas": (0.9, 0.99), "lr": float("inf"), "params": [0, 7], "name": None,
                               "amsgrad": False}]}
    tensors, rest = encode_state(state)
    back = decode_state(json.loads(json.dumps(rest)), tensors)
    assert back["param_groups"] == state["param_groups"] and list(back["state"]) == [0, 7]
    assert torch.equal(back["state"][0]["m"], state["state"][0]["m"])
    with pytest.raises(TypeError, match="cannot store object"):
        encode_state({"x": object()})


def test_a_bad_rng_state_is_an_error_not_a_log_line(acc, tmp_path):
    parts = make_parts(acc)
    ckpt = Checkpointer(tmp_path, acc, every_steps=1, keep=3)
    path = ckpt.save(1, parts, {"step": 1})
    resumed = ckpt.load(path, make_parts(acc))
    python_numpy, tensors = resumed.rng
    with pytest.raises(RuntimeError, match=r"could not restore the random-number generators"):
        ck.restore_rng((python_numpy, {}), acc.device, path)
    with pytest.raises(RuntimeError, match=r"step-000001: could not restore"):
        ck.restore_rng(({**python_numpy, "numpy": ["MT19937", [1, 2]]}, tensors), acc.device, path)


def test_auto_falls_back_to_the_newest_complete_checkpoint_and_says_so(acc, tmp_path, capsys):
    parts = make_parts(acc)
    ckpt = Checkpointer(tmp_path, acc, every_steps=1, keep=5)
    for step in (4, 8, 12):
        ckpt.save(step, parts, {"step": step})
    assert ckpt.resolve("auto").name == "step-000012"
    model = tmp_path / "checkpoints" / "step-000012" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # e.g. a file that never reached the disk
    (tmp_path / "checkpoints" / "step-000008" / "rng_rank0.safetensors").unlink()
    assert ckpt.resolve("auto").name == "step-000004"
    said = capsys.readouterr().out
    assert "step-000012 named by" in said and "is not complete (model.safetensors has 100 bytes" in said
    assert "resuming from" in said and "step-000004, the newest complete checkpoint" in said

    (tmp_path / "checkpoints" / "step-000004" / "checkpoint.json").unlink()
    with pytest.raises(UserError, match=r"no other checkpoint in .* is complete; start over with train.resume=never"):
        ckpt.resolve("auto")
    with pytest.raises(ConfigError, match=r"train.resume=.*step-000008 cannot be loaded: rng_rank0.safetensors is missing"):
        ckpt.resolve(str(tmp_path / "checkpoints" / "step-000008"))


def test_a_checkpoint_of_the_old_pickled_format_is_named_as_such(acc, tmp_path):
    old = tmp_path / "checkpoints" / "step-000010"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"")
    (old / "random_states_0.pkl").write_bytes(b"")
    (tmp_path / "checkpoints" / "latest").write_text("step-000010")
    with pytest.raises(UserError, match="written by an older version of this pipeline"):
        Checkpointer(tmp_path, acc, every_steps=1, keep=2).resolve("auto")


def test_every_file_and_folder_is_fsynced_before_latest_moves(acc, tmp_path, monkeypatch):
    """The order of durable operations: each file fsynced, the folder fsynced, renamed, checkpoints/
    fsynced, then `latest` written, fsynced and renamed into place (and checkpoints/ fsynced again)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", f"{src} -> {dst}"))
        return real_replace(src, dst)

    parts = make_parts(acc)
    ckpt = Checkpointer(tmp_path, acc, every_steps=1, keep=3)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = ckpt.save(5, parts, {"step": 5})
    tmp = str(final.with_name(".tmp-step-000005"))
    commit = events.index(("replace", f"{tmp} -> {final}"))
    latest = next(i for i, e in enumerate(events) if e[0] == "replace" and e[1].endswith("/latest"))
    synced_files = {Path(p).name for kind, p in events[:commit] if kind == "fsync" and p.startswith(tmp + "/")}
    assert synced_files == {p.name for p in final.iterdir()}  # every file, before the folder is renamed
    assert ("fsync", tmp) in events[:commit]  # the folder's entries
    assert ("fsync", str(final.parent)) in events[commit:latest]  # the rename itself
    assert ("fsync", str(final.parent / "latest.tmp")) in events[commit:latest]
    assert events[-1] == ("fsync", str(final.parent))  # latest's rename is durable before save() returns


def test_restored_optimizer_state_takes_its_parameters_memory_format(acc, tmp_path):
    """A channels_last model's Adam moments come back in the weights' layout. torch restores them contiguous;
    CUDA's fused Adam then refuses the step, and CPU's pairs elements by memory order, so the next step
    silently differs from the uninterrupted one. (torch.equal ignores strides: they are compared apart.)"""
    def channels_last_parts(seed: int) -> Parts:
        parts = make_parts(acc, seed=seed)
        parts.vae.to(memory_format=torch.channels_last)  # in place: the optimizer keeps the same parameters
        assert parts.vae[0].weight.stride() == (27, 1, 9, 3)
        return parts

    def step(parts: Parts) -> None:
        torch.manual_seed(5)
        train_a_little(parts, steps=2)

    parts = channels_last_parts(0)
    train_a_little(parts)
    path = Checkpointer(tmp_path, acc, every_steps=1, keep=3).save(3, parts, {"step": 3})
    fresh = channels_last_parts(1)
    Checkpointer(tmp_path, acc, every_steps=1, keep=3).load(path, fresh)
    state = fresh.optimizer.optimizer.state
    for param in fresh.vae.parameters():
        for key, value in state[param].items():
            if value.dim():
                assert value.stride() == param.stride(), (key, value.stride(), param.stride())
    step(parts), step(fresh)  # the next steps: bitwise those of the uninterrupted model
    for (name, a), b in zip(parts.vae.state_dict().items(), fresh.vae.state_dict().values()):
        assert torch.equal(a, b) and a.stride() == b.stride(), name


# --------------------------------------------------------------------------------------------
# Verified by content: damage that keeps every size is found, and auto falls back past it
# --------------------------------------------------------------------------------------------


def _same_size_garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] = ord("}") if data[len(data) // 2] != ord("}") else ord("{")  # breaks the JSON
    path.write_bytes(bytes(data))


def _edit_manifest(**fields):
    def edit(path: Path) -> None:
        m = json.loads(path.read_text())
        m.update(fields)
        path.write_text(json.dumps(m))
    return edit


def _flip_in_tensor_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes: the header still parses, a weight changes
    path.write_bytes(bytes(data))


DAMAGE = {  # (file in step-000008, how it is damaged, phrase the printed line gives)
    "garbled trainer_rank0.json": ("trainer_rank0.json", _same_size_garble, "trainer_rank0.json does not match"),
    "garbled optimizer.json": ("optimizer.json", _same_size_garble, "optimizer.json does not match"),
    "world_size one": ("checkpoint.json", _edit_manifest(world_size="one"), "world_size 'one', not a whole number"),
    "zeroed model": ("model.safetensors", lambda p: p.write_bytes(bytes(p.stat().st_size)), "model.safetensors does not match"),
    "flipped bits in model": ("model.safetensors", _flip_in_tensor_data, "model.safetensors does not match"),
    "step 9999": ("checkpoint.json", _edit_manifest(step=9999), "says step 9999, but the folder is step-000008"),
    "a file outside": ("checkpoint.json", lambda p: _edit_manifest(files={**json.loads(p.read_text())["files"],
                                                                          "../x.json": {"bytes": 2, "sha256": ""}})(p),
                       "not a plain file name inside"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_auto_falls_back_past_damage_that_keeps_the_sizes(acc, tmp_path, capsys, case):
    """Each damage the issue found (a JSON traceback, a ValueError, a silent load of flipped weights, a
    resume "at step 9999") is now a reason to fall back, said in one line."""
    name, damage, phrase = DAMAGE[case]
    parts = make_parts(acc)
    ckpt = Checkpointer(tmp_path, acc, every_steps=1, keep=5)
    for step in (4, 8):
        train_a_little(parts, 1)
        ckpt.save(step, parts, {"step": step})
    capsys.readouterr()
    damage(tmp_path / "checkpoints" / "step-000008" / name)
    assert ckpt.resolve("auto").name == "step-000004"
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and phrase in said[0] and "resuming from" in said[0] and said[0].endswith(
        "step-000004, the newest complete checkpoint"), said
    assert ckpt.load(ckpt.resolve("auto"), make_parts(acc, seed=1)).step == 4
    with pytest.raises(ConfigError, match=r"step-000008 cannot be loaded: .*" + re.escape(phrase.split(",")[0])):
        ckpt.resolve(str(tmp_path / "checkpoints" / "step-000008"))  # named explicitly: refused


def test_latest_and_best_json_cannot_point_outside_their_folder(acc, tmp_path, capsys):
    parts = make_parts(acc)
    ckpt = Checkpointer(tmp_path, acc, every_steps=1, keep=5)
    ckpt.save(4, parts, {"step": 4})
    outside = tmp_path / "elsewhere" / "step-000004"
    outside.parent.mkdir()
    os.rename(tmp_path / "checkpoints" / "step-000004", outside)  # a complete checkpoint, but not in checkpoints/
    ckpt.save(2, parts, {"step": 2})
    (tmp_path / "checkpoints" / "latest").write_text("../elsewhere/step-000004")
    assert ckpt.resolve("auto").name == "step-000002"
    assert "is not valid (it holds '../elsewhere/step-000004', which is not a checkpoint name" in capsys.readouterr().out

    best = ck.BestWeights(tmp_path, "val/loss", "min")
    assert best.update(3, {"val/loss": 1.0}, parts.vae)
    pointer = tmp_path / "best" / "best.json"
    pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "file": "../checkpoints/step-000002/model.safetensors"}))
    with pytest.raises(UserError, match=r"best.json's file field names '\.\./checkpoints/.*', which is outside"):
        ck.BestWeights(tmp_path, "val/loss", "min")
    pointer.write_text('{"step": 3, "value": ')
    with pytest.raises(UserError, match=r"best.json is not valid .* delete it"):
        ck.BestWeights(tmp_path, "val/loss", "min")
