"""The perceptual loss's timm backbone, and a trainer for your own backbone (seed 000's flower classifier).

    backbone, mean, std = build_backbone(cfg.loss.perceptual)   # frozen-ready features_only model

`loss.perceptual.weights` says where the weights come from:
- `hub`: timm's pretrained weights (Hugging Face Hub). Tried from the local cache first with the Hub in
  offline mode; only if that fails and the Hub answers within half a second is it downloaded. With no
  network this fails in about a second with one sentence (timm on its own retries for ~47 s).
- a path to a .pth / .pt / .bin / .safetensors file holding a timm-format state dict of the same
  architecture (a classifier head of any size is ignored). Loaded with timm's own
  `pretrained_cfg_overlay=dict(file=path)`, which works offline; before that, the file's tensors are
  checked against the architecture, so a file of another model fails with one sentence instead of
  being half-loaded (timm loads features_only weights non-strictly).
- `none`: random initialisation (tests only; logs a warning).

To get real weights onto an offline cluster: on a machine with internet run
`hf download timm/<model>.<tag> model.safetensors --local-dir weights/<model>` (the error message prints
the exact command), copy the file over and set `loss.perceptual.weights=weights/<model>/model.safetensors`.
Copying a populated Hugging Face cache (~/.cache/huggingface/hub) also works: `hub` then loads from it
without touching the network.

Seed 000 used the features of a classifier trained on its own flower labels. The same here:

    python -m pipeline.perceptual recipes/flowers.yaml [key=value ...] [--out FILE.safetensors] [--steps N]
           [--lr LR] [--init auto|hub|none|PATH] [--batch-size N]
    accelerate launch -m pipeline.perceptual recipes/flowers.yaml ...     # several GPUs

trains timm's `loss.perceptual.backbone` with num_classes = the manifest's classes on the shards' `cls`
labels (Accelerate, the recipe's data settings and precision), reports the val accuracy, and writes a
safetensors file (with the backbone name and classes in its metadata) that `loss.perceptual.weights`
accepts.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pipeline.config import ConfigError, PerceptualConfig

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
HUB_PROBE_TIMEOUT_S = 0.5


# --------------------------------------------------------------------------------------------
# Building the backbone
# --------------------------------------------------------------------------------------------


def build_backbone(cfg: PerceptualConfig) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """`timm.create_model(cfg.backbone, features_only=True, out_indices=cfg.layers)` with the weights that
    cfg.weights names -> (model in eval mode with requires_grad False, mean, std), where mean/std are the
    backbone's pretrained_cfg normalisation for [0, 1] RGB input. Raises ConfigError with one sentence."""
    import timm

    name = cfg.backbone
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"loss.perceptual.backbone {name!r} is not a timm model{hint}")
    layers = tuple(int(i) for i in cfg.layers)
    if not layers:
        raise ConfigError("loss.perceptual.layers is empty; name at least one feature level, e.g. [1, 2, 3]")
    weights = str(cfg.weights)
    if weights == "none":
        model = _create(name, layers, pretrained=False)
        log.warning("loss.perceptual.weights is none: the perceptual loss uses a randomly initialised %s "
                    "(only meaningful in tests)", name)
    elif weights == "hub":
        model = _create_from_hub(name, layers)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"loss.perceptual.weights is {weights!r}, which is neither hub, none nor an "
                              f"existing {'/'.join(WEIGHT_SUFFIXES)} file")
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ConfigError(f"loss.perceptual.weights file {path} must end in one of {', '.join(WEIGHT_SUFFIXES)}")
        check_weights_file(name, path)
        model = _create(name, layers, pretrained=True, overlay=dict(file=str(path)))
    model.eval().requires_grad_(False)
    pc = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(m) for m in pc.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
    std = tuple(float(s) for s in pc.get("std", timm.data.IMAGENET_DEFAULT_STD))
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return model, mean, std


def _create(name: str, layers: tuple[int, ...], pretrained: bool, overlay: dict | None = None) -> nn.Module:
    import timm

    kwargs = dict(features_only=True, out_indices=layers)
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (IndexError, AssertionError, ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        if _is_download_error(e):
            raise
        try:  # say how many levels there are, if the backbone has features at all
            levels = len(timm.create_model(name, pretrained=False, features_only=True).feature_info)
        except Exception:
            raise ConfigError(f"loss.perceptual.backbone {name} does not support features_only=True "
                              f"({_first_line(e)}); pick a convolutional timm model such as resnet18") from None
        if any(not -levels <= i < levels for i in layers):
            raise ConfigError(f"loss.perceptual.layers {list(layers)} do not fit {name}, which has feature levels "
                              f"0..{levels - 1}") from None
        raise ConfigError(f"timm could not build {name} for the perceptual loss ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _is_download_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or type(e).__module__.startswith(("huggingface_hub", "requests", "urllib", "httpx"))


def check_weights_file(name: str, path: Path) -> None:
    """Every tensor of architecture `name` except its classifier must be in the file with the same shape;
    and a file written by the classifier trainer must name the same backbone. ConfigError otherwise."""
    import timm
    from timm.models import load_state_dict

    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise ConfigError(f"loss.perceptual.weights file {path} is not a readable safetensors file "
                              f"({_first_line(e)})") from None
        if meta.get("backbone") and meta["backbone"] != name:
            raise ConfigError(f"loss.perceptual.weights file {path} holds a {meta['backbone']} but "
                              f"loss.perceptual.backbone is {name}; set the backbone to {meta['backbone']}")
    try:
        sd = load_state_dict(str(path))
    except Exception as e:
        raise ConfigError(f"loss.perceptual.weights file {path} could not be read as a state dict "
                          f"({_first_line(e)})") from None
    try:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            ref = timm.create_model(name, pretrained=False)
    except Exception:  # a model whose __init__ needs real values
        ref = timm.create_model(name, pretrained=False)
    classifier = (ref.pretrained_cfg or {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    expected = {k: v.shape for k, v in ref.state_dict().items()
                if not k.endswith("num_batches_tracked") and not any(k.startswith(c + ".") for c in classifier)}
    bad = [k for k, shape in expected.items() if k not in sd or tuple(sd[k].shape) != tuple(shape)]
    if bad:
        raise ConfigError(f"loss.perceptual.weights file {path} does not fit backbone {name}: {len(bad)} of "
                          f"{len(expected)} tensors are missing or shaped differently (first: {bad[0]}); "
                          f"was it saved from another model?")


@contextlib.contextmanager
def _hf_offline():
    """HF_HUB_OFFLINE for the duration (huggingface_hub reads the variable only at import time)."""
    import huggingface_hub.constants as hf_constants

    old_const, old_env = hf_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hf_constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _reachable(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to url's host (or to the HTTPS proxy, if one is set) be opened within timeout?
    Runs in a daemon thread so that a hanging DNS lookup cannot block longer than timeout either."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy else url)
    host, port = target.hostname, target.port or (443 if target.scheme in ("https", "") else 80)
    if not host:
        return False
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _hf_cached(hub_id: str, filename: str | None) -> bool:
    """Is one of the files timm would load for hub_id in the local Hugging Face cache? (No network, and no
    model is built: deciding this by letting timm try offline costs seconds for large backbones.)"""
    from huggingface_hub import try_to_load_from_cache
    from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, hf_split

    repo, revision = hf_split(hub_id)
    names = [filename] if filename else []
    if filename and filename.endswith(".bin"):
        names.append(filename[:-4] + ".safetensors")
    names += [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    return any(isinstance(try_to_load_from_cache(repo, n, revision=revision), str) for n in names)


def _create_from_hub(name: str, layers: tuple[int, ...]) -> nn.Module:
    import timm
    from huggingface_hub import constants as hf_constants
    from timm.models._hub import check_cached_file

    pc = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(pc, "hf_hub_id", None) if pc is not None else None
    url = getattr(pc, "url", None) if pc is not None else None
    if not hub_id and not url:
        raise ConfigError(f"timm has no pretrained weights for {name}; set loss.perceptual.weights to a "
                          f"file path or none")
    if hub_id:
        where = f"the Hugging Face Hub ({hub_id})"
        advice = (f"run `hf download {hub_id} model.safetensors --local-dir weights/{name}` on a machine with "
                  f"internet, copy the file over")
        probe_url = hf_constants.ENDPOINT
        if _hf_cached(hub_id, getattr(pc, "hf_hub_filename", None)):
            try:
                with _hf_offline():  # from the cache, without a single network request
                    return _create(name, layers, pretrained=True)
            except ConfigError:
                raise
            except Exception as e:  # e.g. an incomplete cache entry: try the network below
                log.info("%s weights could not be loaded from the local Hugging Face cache (%s)", name,
                         _first_line(e))
    else:
        where = f"{url}"
        advice = f"download {url} on a machine with internet, copy the file over"
        probe_url = url
        if check_cached_file(url):
            return _create(name, layers, pretrained=True)
    if not _reachable(probe_url):
        raise ConfigError(
            f"loss.perceptual.weights=hub needs the pretrained {name} weights from {where}, which cannot be "
            f"reached and are not in the local cache: {advice} and set loss.perceptual.weights to the "
            f"file's path (or use none for a random backbone)")
    try:
        return _create(name, layers, pretrained=True)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"loss.perceptual.weights=hub could not download the {name} weights from {where} "
                          f"({_first_line(e)}); {advice} and set loss.perceptual.weights to its path") from None


# --------------------------------------------------------------------------------------------
# Training a classifier on the shards' labels (seed 000's perception network)
# --------------------------------------------------------------------------------------------


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.perceptual",
        description="Train loss.perceptual.backbone as a classifier on the shards' class labels and save "
                    "weights that loss.perceptual.weights accepts.")
    p.add_argument("recipe", help="recipe YAML (its data: section and loss.perceptual.backbone are used)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for training")
    p.add_argument("--out", default=None,
                   help="output .safetensors (default: runs/<recipe>-perceptual/<backbone>.safetensors)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW lr (default 1e-3 from scratch, 1e-4 fine-tuning)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--init", default="auto",
                   help="starting weights: hub | none | PATH; auto = the recipe's loss.perceptual.weights when "
                        "that is hub or an existing file, else none (from scratch)")
    p.add_argument("--batch-size", type=int, default=None, 
                   help="per-device batch (default: data.batch_size_per_device)")
    p.add_argument("--log-every", type=int, default=50, help="print the running loss/accuracy every N steps")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def _init_source(init: str, recipe_weights: str) -> str:
    if init != "auto":
        return init
    if recipe_weights == "hub" or (recipe_weights != "none" and Path(recipe_weights).expanduser().is_file()):
        return recipe_weights
    return "none"


def build_classifier(name: str, num_classes: int, init: str) -> nn.Module:
    """timm classifier `name` with a fresh num_classes head, its trunk from init = hub | none | PATH."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"loss.perceptual.backbone {name!r} is not a timm model")
    if init == "none":
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if init == "hub":
        # Reuse the hub logic (fast offline failure) on a features model, then copy its trunk over.
        import dataclasses as _dc

        feats, _, _ = build_backbone(_dc.replace(PerceptualConfig(), backbone=name, weights="hub", layers=[0]))
        del feats
        return timm.create_model(name, pretrained=True, num_classes=num_classes)  # now cached: no network
    path = Path(init).expanduser()
    if not path.is_file():
        raise ConfigError(f"--init {init!r} is neither hub, none nor an existing weights file")
    check_weights_file(name, path)
    # num_classes differs from the file's head (if any): timm drops the head and loads the rest.
    return timm.create_model(name, pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=str(path)))


def _save_safetensors(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written weights file


def train_classifier(cfg, out: Path, steps: int, lr: float | None, weight_decay: float, init: str,
                     batch_size: int | None = None, log_every: int = 50) -> dict:
    """Train and save; returns {"val_accuracy", "train_accuracy", "steps", "out", ...}. See the module doc."""
    import dataclasses as _dc

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from pipeline.data import DeviceAugment, TrainStream, read_manifest, val_batches

    manifest = read_manifest(cfg.data.shards)
    classes = list(manifest["classes"])
    if len(classes) < 2:
        raise ConfigError(f"{cfg.data.shards}/manifest.json lists {len(classes)} classes; training a classifier "
                          f"needs class labels (shard a folder with one sub-folder per class)")
    if batch_size:
        cfg = _dc.replace(cfg, data=_dc.replace(cfg.data, batch_size_per_device=batch_size))
    name = cfg.loss.perceptual.backbone
    source = _init_source(init, cfg.loss.perceptual.weights)

    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    set_seed(cfg.train.seed)
    model = build_classifier(name, len(classes), source)
    pc = model.pretrained_cfg
    mean = torch.tensor(pc.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pc.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32).view(1, -1, 1, 1)
    mean, std = mean.to(accelerator.device), std.to(accelerator.device)
    augment = DeviceAugment(cfg.data, (0.0, 1.0)).to(accelerator.device)  # [0, 1] like PerceptualDistance
    peak_lr = lr if lr is not None else (1e-3 if source == "none" else 1e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.print(f"training {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
                      f"init: {source}) on {len(classes)} classes for {steps} steps, lr {peak_lr:g}")

    stream = TrainStream(cfg, accelerator.process_index, accelerator.num_processes)
    loss_sum = torch.zeros((), device=accelerator.device)
    correct = torch.zeros((), device=accelerator.device)
    seen = torch.zeros((), device=accelerator.device)
    model.train()
    t0 = time.perf_counter()
    it = iter(stream)
    for step in range(1, steps + 1):
        batch = next(it)
        labels = batch.labels.to(accelerator.device, non_blocking=True)
        x = (augment(batch.images.to(accelerator.device, non_blocking=True), train=True) - mean) / std
        with accelerator.autocast():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), labels)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.numel()
        if step % log_every == 0 or step == steps:
            n = seen.item()
            accelerator.print(f"step {step}/{steps}  loss {loss_sum.item() / n:.4f}  train acc {correct.item() / n:.3f}"
                              f"  {time.perf_counter() - t0:.0f} s")
            train_acc = correct.item() / n
            loss_sum.zero_(), correct.zero_(), seen.zero_()

    # Validation accuracy, each val sample once over all ranks.
    model.eval()
    stats = torch.zeros(2, device=accelerator.device)
    with torch.no_grad():
        for batch in val_batches(cfg, accelerator.process_index, accelerator.num_processes):
            labels = batch.labels.to(accelerator.device)
            x = (augment(batch.images.to(accelerator.device), train=False) - mean) / std
            with accelerator.autocast():
                pred = model(x).argmax(1)
            stats += torch.stack([(pred == labels).sum().float(), torch.tensor(float(labels.numel()),
                                                                               device=stats.device)])
    stats = accelerator.reduce(stats, "sum")
    val_acc = (stats[0] / stats[1]).item() if stats[1] > 0 else float("nan")
    result = {"out": str(out), "backbone": name, "classes": classes, "steps": steps, "init": source,
              "train_accuracy": train_acc, "val_accuracy": val_acc, "val_samples": int(stats[1].item())}
    if accelerator.is_main_process:
        meta = {"backbone": name, "num_classes": str(len(classes)), "classes": json.dumps(classes),
                "val_accuracy": f"{val_acc:.4f}", "steps": str(steps), "init": source,
                "shards": str(cfg.data.shards), "format": "timm state_dict (pipeline.perceptual)"}
        _save_safetensors(accelerator.unwrap_model(model), out, meta)
        accelerator.print(f"val accuracy {val_acc:.3f} on {result['val_samples']} images (chance "
                          f"{1 / len(classes):.3f}); wrote {out}\nuse it with: loss.perceptual.backbone={name} "
                          f"loss.perceptual.weights={out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    import sys

    from pipeline.config import exit_on_config_error, load_config

    args = _parse_args(sys.argv[1:] if argv is None else argv)

    @exit_on_config_error
    def run() -> int:
        cfg = load_config(args.recipe, args.overrides)
        out = Path(args.out) if args.out else Path(cfg.run.dir) / f"{cfg.name}-perceptual" / (
            cfg.loss.perceptual.backbone.replace("/", "_") + ".safetensors")
        if out.suffix != ".safetensors":
            raise ConfigError(f"--out {out} must end in .safetensors")
        if out.exists() and not args.force:
            raise ConfigError(f"--out {out} exists; pass --force to overwrite it or choose another path")
        train_classifier(cfg, out, args.steps, args.lr, args.weight_decay, args.init, args.batch_size,
                         args.log_every)
        return 0

    return run()


if __name__ == "__main__":
    raise SystemExit(main())
