"""A trained model back from its run folder, for evaluation and the sample tools.

    run = load_run("runs/demo")                                   # latest checkpoint, EMA weights
    run = load_run("runs/demo", checkpoint="step-000500", weights="raw", device="cpu")
    x = run.to_model_range(batch.images)                          # uint8 [B,3,H,W] -> the model's range
    mu, logvar = run.model.encode(x)

What is read, and from where (nothing is unpickled):
- the resolved config: RUN_DIR/config.yaml (`key=value` overrides may change evaluation settings such as
  data.val_batch_size_per_device; changing model.* makes the weights not fit, which is one sentence);
- the weights: checkpoints/<name>/ema.safetensors (keys "module.*", the EMA that media and validation
  used during training) or, with weights="raw" or when the run had no EMA, model.safetensors "vae.*";
  the loss's own parameters (the gaussian likelihood's learned log-variance) from model.safetensors "loss.*";
- the image size, in this order: the `image_size` argument, RUN_DIR/model_info.json, the manifest of
  cfg.data.shards, and finally the weights themselves (the size whose model has exactly these tensor
  shapes, when only one does).

User images go through pipeline.images.load_image, the code path `make shards` uses, so a photo is
resized and cropped exactly as the training images were.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from pipeline import durable
from pipeline.config import Config, ConfigError, load_config
from pipeline.errors import UserError
from pipeline.data import Batch, DeviceAugment, check_fits, data_range, read_manifest, sample_shape, val_batches
from pipeline.images import IMAGE_EXTENSIONS, describe_error, load_image
from pipeline.objective import VAELoss
from pipeline.models import VAE, build_model

MODEL_INFO_FILE = "model_info.json"
"""Optional RUN_DIR file {"image_size": int, "classes": [...]} that lets a run outlive its shards."""
MAX_INFERRED_SIZE = 2048
"""The largest image side tried when the size must be inferred from the weights' shapes."""


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: Config
    checkpoint: Path
    """The checkpoint folder the weights came from."""
    step: int
    """Optimizer steps the checkpoint had taken."""
    weights: str
    """ema | raw: which copy of the weights `model` holds."""
    image_size: int
    classes: list[str]
    """Class names by label (from the manifest or model_info.json); empty when unknown."""
    model: VAE
    """In eval mode, gradients off, on `device`."""
    loss: VAELoss
    """The run's loss with its learned parameters, perceptual term off (see evaluate for that)."""
    device: torch.device
    augment: DeviceAugment = field(repr=False)
    data_range: tuple[float, float] | None = None
    """Array runs (model.spatial_dims 1 or 3): the (low, high) data units the training normalised from."""

    @property
    def pixel_dims(self) -> int:
        """C*H*W (C*L, C*D*H*W): the number of sub-pixels bits/dim divides by."""
        return self.model.values_per_sample

    def to_data_units(self, x: Tensor) -> Tensor:
        """Array runs: samples in the model's range -> the data's own units (the inverse of the normalisation)."""
        lo, hi = self.model.output_range
        low, high = self.data_range
        return ((x.float() - lo) / (hi - lo)) * (high - low) + low

    def to_model_range(self, images_uint8: Tensor) -> Tensor:
        """uint8 [B,3,H,W] (any device) -> float on `device` in the model's output range (no augmentation)."""
        return self.augment(images_uint8.to(self.device), train=False)

    def describe(self) -> str:
        return f"{self.run_dir} {self.checkpoint.name} ({self.weights} weights, {self.image_size} px)"


# --------------------------------------------------------------------------------------------
# Finding the checkpoint
# --------------------------------------------------------------------------------------------


def resolve_checkpoint(run_dir: Path, checkpoint: str | None = None) -> Path:
    """The checkpoint folder: `checkpoint` (a name under checkpoints/ or a path) or the one `latest` names."""
    ckpt_dir = run_dir / "checkpoints"
    available = sorted(p.name for p in ckpt_dir.glob("step-*") if (p / "model.safetensors").is_file())
    if checkpoint is None:
        pointer = ckpt_dir / "latest"
        if not pointer.is_file():
            raise UserError(f"run folder {run_dir} has no complete checkpoint yet (no {pointer}); "
                              f"let training save one (train.checkpoint_every_steps) and try again")
        path = durable.inside(ckpt_dir, pointer.read_text().strip(), str(pointer))
    else:
        path = Path(checkpoint) if Path(checkpoint).is_dir() else ckpt_dir / checkpoint
    if not (path / "model.safetensors").is_file():
        listed = ", ".join(available) if available else "none"
        raise UserError(f"checkpoint {path} does not exist or has no model.safetensors "
                          f"(complete checkpoints in {ckpt_dir}: {listed})")
    return path


def _checkpoint_step(path: Path) -> int:
    state = path / "trainer_rank0.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text())["step"])
        except (ValueError, KeyError, TypeError):
            pass
    m = re.search(r"step-(\d+)", path.name)
    return int(m.group(1)) if m else -1


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                          f"the checkpoint is damaged, pick another with --checkpoint") from None


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Entries under `prefix`, prefix removed (and torch.compile's `_orig_mod.` with it)."""
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            k = k[len(prefix):]
            out[k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k] = v
    return out


# --------------------------------------------------------------------------------------------
# The image size
# --------------------------------------------------------------------------------------------


def _size_from_weights(cfg: Config, state: dict[str, Tensor]) -> list[int]:
    """Image sizes whose model has exactly the tensor shapes of `state` (built on the meta device: no memory).
    Stops at two matches: a fully convolutional model fits every size, and then the answer is ambiguous."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    found = []
    for size in range(1, MAX_INFERRED_SIZE + 1):
        try:
            with torch.device("meta"):
                model = build_model(cfg.model, size)
        except ConfigError:
            continue  # the levels do not divide this size
        if {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes:
            found.append(size)
            if len(found) == 2:
                break
    return found


def _image_size_and_classes(run_dir: Path, cfg: Config, state: dict[str, Tensor],
                            image_size: int | None) -> tuple[int, list[str]]:
    info_path = run_dir / MODEL_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    classes = list(info.get("classes", []))
    try:
        manifest = read_manifest(cfg.data.shards)
    except UserError:
        manifest = None  # the shards moved or were deleted: fall back to what the run folder knows
    if manifest is not None and not classes:
        classes = list(manifest["classes"])
    if image_size is not None:
        return int(image_size), classes
    if "image_size" in info:
        return int(info["image_size"]), classes
    if manifest is not None:
        return int(manifest["size"]), classes
    sizes = _size_from_weights(cfg, state)
    if len(sizes) == 1:
        return sizes[0], classes
    raise UserError(f"cannot tell the image size of {run_dir}: its shards folder {cfg.data.shards} is gone and "
                      f"{'no size fits' if not sizes else 'several sizes fit'} the weights; pass --image-size N "
                      f"(the SIZE the shards were made with)")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_run(run_dir: str | Path, overrides: Sequence[str] = (), checkpoint: str | None = None,
             weights: str = "ema", device: str | torch.device | None = None,
             image_size: int | None = None) -> LoadedRun:
    """The model (and loss parameters) of a run folder's checkpoint. UserError with one sentence on a
    missing run folder, checkpoint or weight file, or weights that do not fit the config."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml); give the folder training wrote, "
                          f"e.g. runs/demo")
    if weights not in ("ema", "raw"):
        raise UserError(f"weights must be ema or raw, got {weights!r}")
    cfg = load_config(config_path, list(overrides), check_paths=False)
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    train_state = _read_safetensors(ckpt / "model.safetensors")
    vae_state = _strip(train_state, "vae.")
    used = "raw"
    if weights == "ema" and (ckpt / "ema.safetensors").is_file():
        vae_state, used = _strip(_read_safetensors(ckpt / "ema.safetensors"), "module."), "ema"
    size, classes = _image_size_and_classes(run_dir, cfg, vae_state, image_size)

    device = torch.device(device) if device is not None else default_device()
    model = build_model(cfg.model, size)
    _load_state(model, vae_state, f"{ckpt.name} ({used} weights)")
    loss_cfg = copy.deepcopy(cfg.loss)
    loss_cfg.perceptual.weight = 0.0  # the backbone is frozen and not in the checkpoint; evaluate builds it
    loss = VAELoss(loss_cfg, model.output_range, cfg.model.in_channels, cfg.model.spatial_dims)
    loss_state = {k: v for k, v in _strip(train_state, "loss.").items()
                  if not k.startswith("latent.")}  # the latent alignment's projection: a training-only part
    _load_state(loss, loss_state, f"{ckpt.name} (loss parameters)")
    model.to(device).eval().requires_grad_(False)
    loss.to(device).eval().requires_grad_(False)
    data_range = _data_range(run_dir, cfg)
    augment = DeviceAugment(cfg.data, model.output_range, data_range).to(device)
    return LoadedRun(run_dir=run_dir, cfg=cfg, checkpoint=ckpt, step=_checkpoint_step(ckpt), weights=used,
                     image_size=size, classes=classes, model=model, loss=loss, device=device, augment=augment,
                     data_range=data_range)


def _data_range(run_dir: Path, cfg: Config) -> tuple[float, float] | None:
    """Array runs: the normalisation training used (model_info.json, else the shards' manifest); None for images."""
    if cfg.model.spatial_dims == 2:
        return None
    info_path = run_dir / MODEL_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if "normalization" in info:
        return float(info["normalization"]["low"]), float(info["normalization"]["high"])
    try:
        found = data_range(read_manifest(cfg.data.shards))
    except UserError:
        found = None
    if found is None:
        raise UserError(f"{run_dir} is an array run (model.spatial_dims {cfg.model.spatial_dims}) without "
                          f"{MODEL_INFO_FILE} and its shards {cfg.data.shards} are gone; the data range is unknown")
    return found


def _load_state(module: torch.nn.Module, state: dict[str, Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    own = module.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if result.missing_keys or result.unexpected_keys or wrong:
        detail = (f"missing {result.missing_keys[:3]}" if result.missing_keys else
                  f"unexpected {result.unexpected_keys[:3]}" if result.unexpected_keys else f"shape of {wrong[:3]}")
        raise UserError(f"checkpoint {what} does not fit the model its config.yaml describes ({detail}); "
                          f"do not override model.* or loss.recon/gaussian_logvar when loading a run")


# --------------------------------------------------------------------------------------------
# Inputs: shards and user images
# --------------------------------------------------------------------------------------------


def check_shards(shards_dir: str | Path, image_size: int, cfg: Config | None = None) -> dict:
    """The manifest of a shards folder whose images have the model's size (UserError otherwise); with the
    run's cfg also its spatial dims and channels (signals and volumes)."""
    manifest = read_manifest(shards_dir)
    if cfg is not None:
        check_fits(cfg, manifest, str(shards_dir))
    if sample_shape(manifest) and int(manifest["size"]) != image_size:
        raise UserError(f"shards {shards_dir} hold samples of shape {list(sample_shape(manifest))} but the model "
                          f"was trained on a side of {image_size}; use shards of the training shape")
    if int(manifest["size"]) != image_size:
        raise UserError(f"shards {shards_dir} hold {manifest['size']} px images but the model was trained on "
                          f"{image_size} px; make shards with --size {image_size}")
    return manifest


def split_batches(cfg: Config, shards_dir: str | Path, split: str, rank: int = 0, world_size: int = 1,
                  num_workers: int | None = None) -> Iterator[Batch]:
    """Every sample of one split of a shards folder, each exactly once over all ranks x workers, in a
    fixed order: pipeline.data.val_batches (its reader, batching and corrupt-sample handling), pointed at
    any split."""
    if split not in ("train", "val"):
        raise UserError(f"--split must be train or val, got {split!r}")
    local = copy.deepcopy(cfg)
    local.data.shards = str(shards_dir)
    yield from val_batches(local, rank, world_size, num_workers, split=split)


def is_shards_folder(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def image_files(paths: Sequence[str | Path], extensions=IMAGE_EXTENSIONS, what: str = "images") -> list[Path]:
    """Files named directly, and the files with `extensions` under named folders (sorted, recursive).
    UserError for a path that does not exist or a folder without such files (`what`: their name)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in extensions)
            if not found:
                raise UserError(f"folder {p} holds no {what} ({', '.join(sorted(extensions))})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p} does not exist; give files or folders of {what}")
    return files


def load_images(files: Sequence[Path], size: int) -> Tensor:
    """uint8 [N, 3, size, size] through pipeline.images.load_image (the `make shards` path).
    UserError naming the first file that cannot be read."""
    arrays = []
    for f in files:
        try:
            arrays.append(load_image(f, size))
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for a bad file; all are the user's file
            raise UserError(f"cannot read image {f}: {describe_error(e)}; remove it or convert it to PNG/JPEG") \
                from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def folder_batches(files: Sequence[Path], root_names: Sequence[str], size: int, batch_size: int) -> Iterator[Batch]:
    """User image files as Batches (label -1, key = the name given in root_names)."""
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        yield Batch(load_images(chunk, size), torch.full((len(chunk),), -1, dtype=torch.int64),
                    list(root_names[i:i + batch_size]))


# --------------------------------------------------------------------------------------------
# Noise that belongs to a sample
# --------------------------------------------------------------------------------------------


def key_seed(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def key_noise(keys: Sequence[str], latent_shape: Sequence[int], n_samples: int, seed: int = 0,
              device: torch.device | str = "cpu") -> Tensor:
    """Standard-normal noise [n_samples, B, *latent_shape] drawn from a generator seeded by each sample's key.

    A sample's noise depends only on (key, seed), not on the batch it lands in or the number of processes,
    so a stochastic estimate (ELBO, IWAE) of a sample is the same however the data is split."""
    out = torch.empty((n_samples, len(keys), *latent_shape))
    for i, key in enumerate(keys):
        g = torch.Generator().manual_seed(key_seed(key, seed))
        out[:, i] = torch.randn((n_samples, *latent_shape), generator=g)
    return out.to(device)
