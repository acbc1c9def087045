"""Train a classifier on the shards' class labels to serve as the perceptual loss's backbone (as the
original flowers VAE did with its own flower classifier): the weights file it writes is what
`loss.perceptual.weights` accepts.

    python -m pipeline.classifier recipes/flowers.yaml [key=value ...] [--out FILE.safetensors] [--steps N]
           [--lr LR] [--init auto|hub|none|PATH] [--batch-size N]
    accelerate launch -m pipeline.classifier recipes/flowers.yaml ...     # several GPUs

trains timm's `loss.perceptual.backbone` with num_classes = the manifest's classes on the shards' `cls`
labels (Accelerate, the recipe's data settings and precision), reports the val accuracy, and writes a
safetensors file (with the backbone name and classes in its metadata) that `loss.perceptual.weights`
accepts.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from pipeline import durable
from pipeline.config import ConfigError, PerceptualConfig
from pipeline.errors import UserError, exit_on_user_error
from pipeline.objective.perceptual import build_backbone, check_weights_file

def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.classifier",
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
        raise UserError(f"--init {init!r} is neither hub, none nor an existing weights file")
    check_weights_file(name, path)
    # num_classes differs from the file's head (if any): timm drops the head and loads the rest.
    return timm.create_model(name, pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=str(path)))


def _save_safetensors(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic and durable: a killed run never leaves a half-written weights file
    durable.write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata),
                       tmp=path.with_name(path.name + ".tmp"), errors=(SafetensorError,))


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
        raise UserError(f"{cfg.data.shards}/manifest.json lists {len(classes)} classes; training a classifier "
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
                "shards": str(cfg.data.shards), "format": "timm state_dict (pipeline.classifier)"}
        _save_safetensors(accelerator.unwrap_model(model), out, meta)
        accelerator.print(f"val accuracy {val_acc:.3f} on {result['val_samples']} images (chance "
                          f"{1 / len(classes):.3f}); wrote {out}\nuse it with: loss.perceptual.backbone={name} "
                          f"loss.perceptual.weights={out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    import sys

    from pipeline.config import load_config

    args = _parse_args(sys.argv[1:] if argv is None else argv)

    @exit_on_user_error
    def run() -> int:
        cfg = load_config(args.recipe, args.overrides)
        out = Path(args.out) if args.out else Path(cfg.run.dir) / f"{cfg.name}-perceptual" / (
            cfg.loss.perceptual.backbone.replace("/", "_") + ".safetensors")
        if out.suffix != ".safetensors":
            raise UserError(f"--out {out} must end in .safetensors")
        if out.exists() and not args.force:
            raise UserError(f"--out {out} exists; pass --force to overwrite it or choose another path")
        train_classifier(cfg, out, args.steps, args.lr, args.weight_decay, args.init, args.batch_size,
                         args.log_every)
        return 0

    return run()


if __name__ == "__main__":
    raise SystemExit(main())
