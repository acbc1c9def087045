"""Resumable checkpoints that are never half-written, loaded without unpickling.

Layout of `<run_dir>/checkpoints/`:

    step-000500/            one complete checkpoint
        model.safetensors   Accelerate save_state: model weights (safetensors),
        optimizer.bin       optimizer (+ scaler.pt in fp16), random_states_<rank>.pkl —
        random_states_0.pkl Accelerate loads all of these with torch.load(weights_only=True)
        ema.safetensors     the EMA weights (safetensors)
        trainer_rank0.json  per rank: step, images seen, data-stream position (plain JSON)
    latest                  text: the name of the newest COMPLETE checkpoint

A save goes to `.tmp-step-000500/` and is renamed only when every rank has written its part;
`latest` is then replaced atomically. A kill at any moment leaves `latest` pointing at a complete
checkpoint (or absent), and leftover `.tmp-*` folders are removed at the next start.
We do not use `accelerator.register_for_checkpointing`: Accelerate reloads those objects with
`weights_only=False`, i.e. it would unpickle them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError


class Checkpointer:
    def __init__(self, run_dir: Path, accelerator: Accelerator, every_steps: int, keep: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.every_steps = every_steps
        self.keep = keep
        if accelerator.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):  # a save that was killed halfway
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- saving

    def maybe_save(self, step: int, ema: torch.nn.Module | None, trainer_state: Callable[[], dict],
                   force: bool = False) -> bool:
        """Save at every `every_steps` step (or when forced: at the end, on a stop signal).
        `trainer_state` is only called when a save happens."""
        if not force and step % self.every_steps != 0:
            return False
        if self.latest_name() == _name(step):  # already saved at this step (e.g. end == periodic)
            return False
        self.save(step, ema, trainer_state())
        return True

    def save(self, step: int, ema: torch.nn.Module | None, trainer_state: dict) -> Path:
        acc = self.accelerator
        final = self.dir / _name(step)
        tmp = self.dir / f".tmp-{_name(step)}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)  # every rank writes its RNG state
        if acc.is_main_process and ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                      str(tmp / "ema.safetensors"))
        _write_json(tmp / f"trainer_rank{acc.process_index}.json", trainer_state)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_text(self.dir / "latest", final.name)  # the commit point
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        """Keep the newest `keep` checkpoints by completion time (not by name: a run restarted with
        train.resume=never writes low step numbers beside high ones), never the one `latest` names."""
        latest = self.latest_name()
        complete = sorted((p for p in self.dir.glob("step-*") if p.is_dir() and p.name != latest),
                          key=lambda p: p.stat().st_mtime)
        for old in complete[: max(0, len(complete) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------- loading

    def latest_name(self) -> str | None:
        pointer = self.dir / "latest"
        return pointer.read_text().strip() if pointer.is_file() else None

    def resolve(self, resume: str) -> Path | None:
        """train.resume -> the checkpoint folder to load (None: start fresh)."""
        if resume == "never":
            return None
        if resume == "auto":
            name = self.latest_name()
            return self.dir / name if name else None
        path = Path(resume)
        if not (path / "model.safetensors").is_file():
            raise ConfigError(f"train.resume={resume} is not a checkpoint folder (no model.safetensors); "
                              f"use auto, never, or a path like {self.dir}/step-000500")
        return path

    def load(self, path: Path, ema: torch.nn.Module | None) -> dict:
        """Restore model, optimizer, scaler, RNG (Accelerate, weights_only) + EMA; return this rank's trainer state."""
        acc = self.accelerator
        acc.load_state(str(path))
        if ema is not None and (path / "ema.safetensors").is_file():
            ema.load_state_dict(load_file(str(path / "ema.safetensors"), device="cpu"))
        state_file = path / f"trainer_rank{acc.process_index}.json"
        if not state_file.is_file():
            raise ConfigError(f"checkpoint {path} has no {state_file.name}: it was written by a run with fewer "
                              f"processes; resume with the same number of processes or set train.resume=never")
        return json.loads(state_file.read_text())


def _name(step: int) -> str:
    return f"step-{step:06d}"


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
