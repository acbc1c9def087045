"""Resumable checkpoints: complete or invisible, durable, and read back without unpickling anything.

Layout of `<run_dir>/checkpoints/`:

    step-000500/
        model.safetensors       the VAE ("vae.*") and the loss's learned parameters ("loss.*")
        ema.safetensors         the EMA weights ("module.*"), when optim.ema_decay > 0
        optimizer.safetensors   the optimizer's tensors (Adam moments, step counts) ...
        optimizer.json          ... and the rest of its state dict (param groups)
        scaler.json             the fp16 GradScaler's state (fp16 only)
        disc.safetensors        the adversarial stage (when loss.adversarial is on): the discriminator
                                ("disc.*") and its running state ("state.*": the LeCam EMAs) ...
        disc_optimizer.*        ... and its optimizer, as optimizer.* (its lr is a function of the step)
        rng_rank0.safetensors   per rank: the torch CPU and CUDA generator states
        trainer_rank0.json      per rank: step, images seen, data-stream position, Python and numpy
                                RNG states, the logging interval's partial sums
        checkpoint.json         written last: step, world size, and every file above with its size
                                and sha256
    latest                      the name of the newest complete checkpoint

Everything is safetensors or JSON: nothing is unpickled (not even with torch's weights_only).

A save writes into `.tmp-step-000500/`; every file is fsynced. When all ranks have written theirs,
the main process writes checkpoint.json (with the size of every file, gathered from the ranks),
fsyncs the folder, renames it to `step-000500/`, fsyncs `checkpoints/`, and only then replaces
`latest` (write, fsync, rename, fsync). A kill or a power cut at any moment leaves `latest` naming a
complete checkpoint or nothing. `train.resume=auto` checks anyway: if the checkpoint `latest` names
is not complete it falls back to the newest complete one and says so.

Complete means verified by content, not only by size: before a checkpoint is loaded every file is
re-hashed against the sha256 in checkpoint.json, every JSON file must parse, checkpoint.json's step,
world size and file names must be in range (the step equal to the folder's, each name a plain name
inside the folder), and each trainer_rank<r>.json must hold that step. Any failure is a reason for
`train.resume=auto` to fall back to the newest complete checkpoint, with one printed line; a named
checkpoint (`train.resume=<folder>`) that fails is refused in one sentence. Re-hashing costs about
0.7 s per GB of checkpoint on one CPU core, at each save and before a resume (README: an 84 M-parameter
model with EMA and Adam moments, 1.34 GB, 0.9 s).

RNG states are restored strictly: a checkpoint whose RNG state cannot be applied is an error, not
a log line. They are applied by `restore_rng`, which train.py calls as the very last thing before
the first step, so no setup work after loading (building data loaders, the W&B run, reading the
media images) can shift the streams that drive the reparameterisation noise and the augmentation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipeline import durable, faults
from pipeline.errors import ConfigError, UserError
from pipeline.durable import sha256_file

FORMAT = 3  # 3: checkpoint.json lists {"bytes", "sha256"} per file; 2 (sizes only) is still read
READABLE_FORMATS = (2, FORMAT)
MANIFEST = "checkpoint.json"


@dataclass
class Resumed:
    """What a loaded checkpoint gives back to the trainer."""

    path: Path
    step: int
    trainer: dict
    """This rank's trainer_rank<r>.json (rank 0's when the world size changed)."""
    same_world_size: bool
    rng: tuple[dict, dict[str, torch.Tensor]] | None
    """(python/numpy states, torch generator states) to hand to restore_rng; None when reseeding."""


class Checkpointer:
    def __init__(self, run_dir: Path, accelerator: Accelerator, every_steps: int, keep: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.every_steps = every_steps
        self.keep = keep
        self.last_save_seconds = 0.0
        if accelerator.is_main_process:  # (the caller holds the run folder's lock)
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in [*self.dir.glob(".tmp-*"), *self.dir.glob(".trash-*")]:  # saves or prunes killed halfway
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- saving

    def maybe_save(self, step: int, parts: "Parts", trainer_state: Callable[[], dict], force: bool = False) -> bool:
        """Save at every `every_steps` step (or when forced: at the end, on a stop signal).
        `trainer_state` is only called when a save happens."""
        if not force and step % self.every_steps != 0:
            return False
        if self.latest_name() == _name(step):  # already saved at this step (e.g. end == periodic)
            return False
        self.save(step, parts, trainer_state())
        return True

    def save(self, step: int, parts: "Parts", trainer_state: dict) -> Path:
        acc = self.accelerator
        started = time.perf_counter()
        final = self.dir / _name(step)
        tmp = self.dir / f".tmp-{_name(step)}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()

        written: dict[str, dict] = {}  # file -> {"bytes", "sha256"}, for checkpoint.json
        rank = acc.process_index
        python_numpy, generators = rng_state(acc.device)
        written.update(_save_tensors(tmp / f"rng_rank{rank}.safetensors", generators))
        written.update(_save_json(tmp / f"trainer_rank{rank}.json", {**trainer_state, "rng": python_numpy}))
        if acc.is_main_process:
            written.update(_save_tensors(tmp / "model.safetensors", parts.model_state()))
            if parts.ema is not None:
                written.update(_save_tensors(tmp / "ema.safetensors", parts.ema.state_dict()))
            written.update(_save_optimizer(tmp, "optimizer", parts.optimizer))
            if parts.disc is not None:
                written.update(_save_tensors(tmp / "disc.safetensors", parts.disc_model_state()))
                written.update(_save_optimizer(tmp, "disc_optimizer", parts.disc_optimizer))
            if acc.scaler is not None:
                written.update(_save_json(tmp / "scaler.json", acc.scaler.state_dict()))
        everything = gather_object([written]) if acc.num_processes > 1 else [written]
        faults.kill_at("checkpoint", step, acc.is_main_process)

        if acc.is_main_process:
            files = {name: entry for part in everything for name, entry in part.items()}
            _save_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "world_size": acc.num_processes,
                                        "files": dict(sorted(files.items()))})
            # A run restarted with resume=never can reach this step again: its old folder goes to the trash.
            durable.replace_folder(tmp, final, parked=_trash(final))
            durable.write_text(self.dir / "latest", final.name, tmp=self.dir / "latest.tmp")  # the commit point
            self._prune()
        acc.wait_for_everyone()
        self.last_save_seconds = time.perf_counter() - started
        faults.kill_at("after-checkpoint", step, acc.is_main_process)
        return final

    def _prune(self) -> None:
        """Keep the newest `keep` checkpoints by completion time (not by name: a run restarted with
        train.resume=never writes low step numbers beside high ones), never the one `latest` names."""
        latest = self.latest_name()
        complete = sorted((p for p in self.dir.glob("step-*") if p.is_dir() and p.name != latest),
                          key=lambda p: p.stat().st_mtime)
        for old in complete[: max(0, len(complete) - (self.keep - 1))]:
            _discard(old)

    # ---------------------------------------------------------------- finding

    def latest_name(self) -> str | None:
        """The name `latest` holds (whatever it holds: resolve() checks it is a checkpoint name)."""
        pointer = self.dir / "latest"
        return pointer.read_bytes().decode("utf-8", "replace").strip() if pointer.is_file() else None

    def resolve(self, resume: str) -> Path | None:
        """train.resume -> the checkpoint folder to load (None: start fresh). Raises ConfigError with one
        sentence when the named checkpoint is incomplete and nothing complete can stand in for it."""
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            problem = incomplete_reason(path)
            if problem:
                raise ConfigError(f"train.resume={resume} cannot be loaded: {problem}; use auto, never, or a "
                                  f"complete checkpoint folder such as {self.dir}/step-000500")
            return path
        name = self.latest_name()
        candidates = sorted((p for p in self.dir.glob("step-*") if p.is_dir() and _step_of(p) >= 0),
                            key=_step_of, reverse=True)
        if name is None and not candidates:
            return None
        if name is not None:
            if not re.fullmatch(r"step-\d+", name):  # `latest` must name a folder in checkpoints/, nothing else
                problem = f"it holds {name[:60]!r}, which is not a checkpoint name such as step-000500"
                said = f"{self.dir / 'latest'} is not valid ({problem})"
            else:
                problem = incomplete_reason(self.dir / name)
                if not problem:
                    return self.dir / name
                said = f"checkpoint {self.dir / name} named by {self.dir / 'latest'} is not complete ({problem})"
        else:
            said = f"{self.dir / 'latest'} is missing"
        # The newest complete one; each candidate is re-hashed, so stop at the first that passes.
        complete = next((p for p in candidates if p.name != name and not incomplete_reason(p)), None)
        if complete is None:
            raise UserError(f"{said} and no other checkpoint in {self.dir} is complete; start over with "
                              f"train.resume=never (or in a new run folder)")
        self.accelerator.print(f"warning: {said}; resuming from {complete}, the newest complete checkpoint")
        return complete

    # ---------------------------------------------------------------- loading

    def load(self, path: Path, parts: "Parts") -> Resumed:
        """Restore weights, optimizer, EMA and scaler now; return this rank's trainer state and its RNG
        states, to be applied with restore_rng() right before the first step."""
        acc = self.accelerator
        manifest = json.loads((path / MANIFEST).read_text())  # checked by resolve() (incomplete_reason)
        saved_world = int(manifest["world_size"])
        state = _load_tensors(path / "model.safetensors")
        parts.load_model_state(state, path)
        if parts.ema is not None:
            if (path / "ema.safetensors").is_file():
                parts.ema.load_state_dict(_load_tensors(path / "ema.safetensors"))
            else:  # EMA switched on for a run that trained without it: start it from the weights
                parts.ema.module.load_state_dict(parts.vae.state_dict())
        with _hyperparameters_kept(parts.optimizer):
            _load_optimizer(path, "optimizer", parts.optimizer)
        if parts.disc is not None:
            if (path / "disc.safetensors").is_file():
                parts.load_disc_state(_load_tensors(path / "disc.safetensors"), path)
                with _hyperparameters_kept(parts.disc_optimizer):
                    _load_optimizer(path, "disc_optimizer", parts.disc_optimizer)
            else:  # a run trained without the adversarial stage, continued with it: a new discriminator
                acc.print(f"checkpoint {path} holds no discriminator (trained without loss.adversarial): the "
                          f"discriminator starts from its initial weights")
        elif (path / "disc.safetensors").is_file():
            acc.print(f"checkpoint {path} holds a discriminator, but this run has loss.adversarial off: the VAE "
                      f"continues without it")
        if acc.scaler is not None and (path / "scaler.json").is_file():
            acc.scaler.load_state_dict(json.loads((path / "scaler.json").read_text()))
        same = saved_world == acc.num_processes
        rank = acc.process_index if same else 0
        trainer = json.loads((path / f"trainer_rank{rank}.json").read_text())
        rng = (trainer.pop("rng"), _load_tensors(path / f"rng_rank{rank}.safetensors")) if same else None
        trainer.pop("rng", None)
        return Resumed(path=path, step=int(manifest["step"]), trainer=trainer, same_world_size=same, rng=rng)


@dataclass
class Parts:
    """The objects a checkpoint holds, as the trainer has them."""

    vae: torch.nn.Module  # the bare model (not DDP, not compiled)
    loss: torch.nn.Module  # the loss, whose learned log-variance is a parameter
    optimizer: Any  # the prepared optimizer (state_dict / load_state_dict)
    ema: torch.nn.Module | None
    disc: torch.nn.Module | None = None  # the adversarial stage's discriminator (bare), when on
    disc_state: torch.nn.Module | None = None  # its running state (buffers: the LeCam EMAs)
    disc_optimizer: Any = None  # its prepared optimizer

    def model_state(self) -> dict[str, torch.Tensor]:
        return {**{f"vae.{k}": v for k, v in self.vae.state_dict().items()},
                **{f"loss.{k}": v for k, v in self.loss.state_dict().items()}}

    def load_model_state(self, state: dict[str, torch.Tensor], path: Path) -> None:
        vae = {k[4:]: v for k, v in state.items() if k.startswith("vae.")}
        loss = {k[5:]: v for k, v in state.items() if k.startswith("loss.")}
        for name, module, part in (("model", self.vae, vae), ("loss", self.loss, loss)):
            try:
                module.load_state_dict(part, strict=True)
            except RuntimeError as e:
                first = str(e).split("\n\t", 1)[-1].split("\n")[0]
                raise UserError(f"checkpoint {path} does not fit this run's {name} ({first}); resume with the "
                                  f"recipe the run was trained with, or start over with train.resume=never") from None

    def disc_model_state(self) -> dict[str, torch.Tensor]:
        state = {f"disc.{k}": v for k, v in self.disc.state_dict().items()}
        if self.disc_state is not None:
            state.update({f"state.{k}": v for k, v in self.disc_state.state_dict().items()})
        return state

    def load_disc_state(self, state: dict[str, torch.Tensor], path: Path) -> None:
        modules = [("discriminator", self.disc, "disc.")]
        if self.disc_state is not None:
            modules.append(("discriminator state", self.disc_state, "state."))
        for name, module, prefix in modules:
            try:
                module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            except RuntimeError as e:
                first = str(e).split("\n\t", 1)[-1].split("\n")[0]
                raise UserError(f"checkpoint {path} does not fit this run's {name} ({first}); resume with the "
                                  f"loss.adversarial settings the run was trained with") from None


class BestWeights:
    """The weights with the best value of a validation metric so far, kept in run_dir/best/:
    step-NNNNNN.safetensors (a plain state dict of the evaluated model) and best.json {"step",
    "metric", "value", "file"}, the commit point, replaced atomically after the weights are durable.
    A restarted run reads best.json, so a resumed run only replaces what it beats."""

    def __init__(self, run_dir: Path, metric: str, mode: str):
        self.dir = Path(run_dir) / "best"
        self.metric, self.mode = metric, mode
        pointer = self.dir / "best.json"
        self.state: dict | None = _read_best(pointer) if pointer.is_file() else None

    def update(self, step: int, metrics: dict, model: torch.nn.Module) -> bool:
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or not np.isfinite(value):
            return False
        if self.state is not None:
            best = self.state["value"]
            if (value >= best) if self.mode == "min" else (value <= best):
                return False
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{_name(step)}.safetensors"
        durable.write_with(self.dir / name, lambda tmp: _write_tensors(tmp, model.state_dict()), errors=(SafetensorError,))
        self.state = {"step": step, "metric": self.metric, "value": float(value), "file": name}
        durable.write_json(self.dir / "best.json", self.state, tmp=self.dir / "best.json.tmp")
        for old in self.dir.glob("step-*.safetensors"):  # earlier bests, and a file a kill left behind
            if old.name != name:
                old.unlink(missing_ok=True)
        return True

    def weights(self) -> dict[str, torch.Tensor] | None:
        if self.state is None:
            return None
        return _load_tensors(durable.inside(self.dir, self.state["file"], f"{self.dir / 'best.json'}'s file field"))


def _read_best(pointer: Path) -> dict:
    try:
        state = json.loads(pointer.read_text(encoding="utf-8"))
        ok = isinstance(state, dict) and isinstance(state.get("file"), str) and np.isfinite(float(state["value"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise UserError(f"{pointer} is not valid (best weights so far: step, metric, value, file); delete it "
                          f"(and its step-*.safetensors) to start tracking the best weights afresh")
    durable.inside(pointer.parent, state["file"], f"{pointer}'s file field")
    return state


# --------------------------------------------------------------------------------------------
# Completeness
# --------------------------------------------------------------------------------------------


def incomplete_reason(path: Path) -> str | None:
    """None when `path` is a complete checkpoint, verified by content; else what is wrong, as a phrase.
    Reads every file once (sha256), so it costs about what loading the checkpoint does."""
    manifest = path / MANIFEST
    if not path.is_dir():
        return f"{path} does not exist"
    if not manifest.is_file():
        if any(path.glob("random_states_*.pkl")):
            return f"{path} was written by an older version of this pipeline (pickled Accelerate state)"
        return f"{path} has no {MANIFEST}"
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
        if m["format"] not in READABLE_FORMATS:
            return f"{path} has checkpoint format {m['format']!r}, this version reads {FORMAT}"
        step, world, files = m["step"], m["world_size"], dict(m["files"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        return f"{manifest} is not valid ({type(e).__name__})"
    if type(step) is not int or step < 0:
        return f"{manifest} has step {step!r}, not a whole number >= 0"
    if type(world) is not int or world < 1:
        return f"{manifest} has world_size {world!r}, not a whole number >= 1"
    if _step_of(path) >= 0 and step != _step_of(path):
        return f"{manifest} says step {step}, but the folder is {path.name}"
    needed = {"model.safetensors", "optimizer.safetensors", "optimizer.json",
              *(f"{kind}_rank{r}.{ext}" for r in range(world) for kind, ext in (("trainer", "json"), ("rng", "safetensors")))}
    if needed - files.keys():
        return f"{manifest} does not list {sorted(needed - files.keys())[0]}"
    for name, entry in files.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+\.(safetensors|json)", name):
            return f"{manifest} lists a file {str(name)[:60]!r}, which is not a plain file name inside {path}"
        try:
            size, digest = (int(entry), None) if m["format"] == 2 else (int(entry["bytes"]), str(entry["sha256"]))
        except (ValueError, KeyError, TypeError):
            return f"{manifest} is not valid (the entry of {name})"
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
        if digest is not None and sha256_file(f) != digest:
            return f"{name} does not match the sha256 it was written with (its content changed on disk)"
    # Parsed too: catches what a format-2 checkpoint (sizes only) cannot, and values out of range.
    for name in files:
        if not name.endswith(".json"):
            continue
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return f"{name} is not valid JSON"
        if name.startswith("trainer_rank") and (not isinstance(data, dict) or data.get("step") != step):
            return f"{name} holds step {data.get('step') if isinstance(data, dict) else None!r}, {MANIFEST} says {step}"
    for name in files:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path / name), "pt") as st:
                    st.keys()
            except Exception as e:  # noqa: BLE001 - any failure to read the header: the file is damaged
                return f"{name} cannot be read ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})"
    return None


def _step_of(path: Path) -> int:
    m = re.fullmatch(r"step-(\d+)", path.name)
    return int(m.group(1)) if m else -1


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------


def rng_state(device: torch.device) -> tuple[dict, dict[str, torch.Tensor]]:
    """(Python and numpy generator states as JSON data, torch generator states as uint8 tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    python_numpy = {"python": [version, list(internal), gauss],
                    "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    return python_numpy, tensors


def restore_rng(saved: tuple[dict, dict[str, torch.Tensor]], device: torch.device, where: Path) -> None:
    """Apply states from rng_state(); any mismatch is an error naming the checkpoint."""
    python_numpy, tensors = saved
    try:
        version, internal, gauss = python_numpy["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = python_numpy["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(tensors["torch_cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise RuntimeError(f"checkpoint {where}: could not restore the random-number generators ({e!r}); the "
                           f"resumed run would not repeat the uninterrupted one. Resume on the same kind of "
                           f"device, or start over with train.resume=never") from None


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Run a block (media, validation) without moving any generator the training step draws from."""
    saved = rng_state(device)
    try:
        yield
    finally:
        restore_rng(saved, device, Path("(in memory)"))


def seed_rng(device: torch.device, *key) -> None:
    """Seed Python, numpy and torch (CPU and `device`) from a hash of `key` (e.g. seed, rank)."""
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") % 2**63
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# State dicts without pickle: tensors to safetensors, everything else to JSON
# --------------------------------------------------------------------------------------------


def encode_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """A state dict -> (tensors by path, JSON data with {"__tensor__": path} in their places).
    Dicts with non-string keys and tuples are tagged so decode_state rebuilds them exactly."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[k, enc(v, f"{path}/{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")

    return tensors, enc(obj, "")


def decode_state(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__dict__" in data:
            return {k: decode_state(v, tensors) for k, v in data["__dict__"]}
        if "__tuple__" in data:
            return tuple(decode_state(v, tensors) for v in data["__tuple__"])
    if isinstance(data, list):
        return [decode_state(v, tensors) for v in data]
    return data


# --------------------------------------------------------------------------------------------
# Durable files
# --------------------------------------------------------------------------------------------


def _name(step: int) -> str:
    return f"step-{step:06d}"


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Write into a checkpoint's temporary folder (durable.write_staged: the folder's rename is the atomic
    step) and return {name: {"bytes", "sha256"}} for checkpoint.json (the hash reads back the page cache).
    A full disk comes as a SafetensorError carrying the OS message."""
    durable.write_staged(path, lambda p: _write_tensors(p, tensors), errors=(SafetensorError,))
    return {path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}}


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # clone(): safetensors refuses tensors that share memory (views of one buffer)
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(path))


def _save_optimizer(folder: Path, stem: str, optimizer) -> dict[str, int]:
    tensors, rest = encode_state(optimizer.state_dict())
    return {**_save_tensors(folder / f"{stem}.safetensors", tensors), **_save_json(folder / f"{stem}.json", rest)}


def _load_optimizer(path: Path, stem: str, optimizer) -> None:
    state = decode_state(json.loads((path / f"{stem}.json").read_text()), _load_tensors(path / f"{stem}.safetensors"))
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {path}: the {stem.replace('_', ' ')} state does not fit this run's parameters "
                          f"({e}); resume with the recipe the run was trained with") from None
    match_parameter_layout(optimizer)


def match_parameter_layout(optimizer) -> None:
    """Give every per-parameter state tensor (Adam's moments) its parameter's memory format.

    torch's `Optimizer.load_state_dict` casts state to the parameter's dtype and device but leaves it
    contiguous, as it was saved. With channels_last weights that breaks the fused Adam kernels: on CUDA
    they refuse the step ("params, grads, exp_avgs, and exp_avg_sqs must have same dtype, device, and
    layout"); on CPU they pair elements by memory order and silently update each weight with another
    element's moments. Values are unchanged here (a copy into the parameter's layout)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside Accelerate's wrapper
    for param, state in inner.state.items():
        for key, value in state.items():
            if (isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0
                    and value.stride() != param.stride()):
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


@contextlib.contextmanager
def _hyperparameters_kept(optimizer):
    """torch's load_state_dict replaces the param groups with the saved ones, hyperparameters included: put
    this run's back (lr, betas, eps, weight decay: from its config, as the optimizer was built), so a run
    resumed with other optimizer settings trains with them (pipeline.resume_policy). The state — moments,
    step counts — is the checkpoint's; the lr is set again before every step anyway."""
    mine = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    yield
    for group, hyperparameters in zip(optimizer.param_groups, mine, strict=True):
        group.update(hyperparameters)


def trainer_state(path: Path) -> dict:
    """Rank 0's trainer state in the checkpoint at `path` (step, data position, the config train.py stored),
    to be read before anything is built or loaded."""
    try:
        return json.loads((path / "trainer_rank0.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint file {path / 'trainer_rank0.json'} cannot be read ({e}); resume from another "
                          f"checkpoint (train.resume=<folder>) or start over with train.resume=never") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint file {path} cannot be read ({e}); resume from another checkpoint "
                          f"(train.resume=<folder>) or start over with train.resume=never") from None


def _save_json(path: Path, data: Any) -> dict[str, dict]:
    """Into a checkpoint's temporary folder, like _save_tensors."""
    text = json.dumps(data).encode("utf-8")
    durable.write_staged(path, lambda p: p.write_bytes(text))
    return {path.name: {"bytes": len(text), "sha256": hashlib.sha256(text).hexdigest()}}


def _trash(path: Path) -> Path:
    """Where a checkpoint folder goes before it is deleted (removed at the next start if a kill leaves it)."""
    return path.with_name(f".trash-{path.name}-{os.getpid()}")


def _discard(path: Path) -> None:
    """Remove a checkpoint folder so that it is never seen half-deleted: rename it away, then delete. The
    rename is not a durability step (a crash before it reaches the disk leaves a complete checkpoint that
    the next prune removes again), so it is a plain os.replace, not pipeline.durable."""
    trash = _trash(path)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
